//! The one interface the driver talks to a NIC through, and its backends.
//!
//! A [`Device`] is a PCI function as VFIO presents it: regions (BAR0, configuration
//! space) read and written by offset, host memory mapped for DMA, interrupts delivered
//! to eventfds. The driver ([`crate::driver`]) is written once against this trait;
//! the backends are the in-process emulator ([`InProcess`]), the emulator in another
//! process over vfio-user, and a real device through kernel VFIO. Every call returns a
//! `Result`: a transport that fails says so, nothing is swallowed.

use std::sync::{Arc, Mutex, MutexGuard};

use hw_sim::device::NicDevice;
pub use hw_sim::device::{REGION_BAR0, REGION_CONFIG};
use hw_sim::dma::{EventFd, Mapping, SharedMemory};

/// A transport failure.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// The device refused a request, or the request is outside what it offers.
    #[error("{0}")]
    Refused(String),
}

/// A PCI function, however it is reached.
pub trait Device: Send {
    /// How the device is reached, for messages (`in-process`, `vfio-user:/run/nic.sock`).
    fn describe(&self) -> String;
    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// Make `mem` visible to the device at `iova`.
    fn dma_map(&mut self, iova: u64, mem: &SharedMemory) -> Result<(), DeviceError>;
    fn dma_unmap(&mut self, iova: u64, len: u64) -> Result<(), DeviceError>;
    /// Deliver MSI-X vector `vector` to `fd`.
    fn set_irq(&mut self, vector: u32, fd: &EventFd) -> Result<(), DeviceError>;

    fn read32(&mut self, offset: u32) -> Result<u32, DeviceError> {
        let mut b = [0u8; 4];
        self.region_read(REGION_BAR0, offset.into(), &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn write32(&mut self, offset: u32, v: u32) -> Result<(), DeviceError> {
        self.region_write(REGION_BAR0, offset.into(), &v.to_le_bytes())
    }
}

/// The emulated NIC linked into this process. The model may be shared (a test offers
/// packets through it while the driver holds this handle); dropping the handle
/// detaches the host from the device, as a closed vfio-user connection does.
#[derive(Debug)]
pub struct InProcess {
    dev: Arc<Mutex<NicDevice>>,
}

impl InProcess {
    pub fn new(dev: Arc<Mutex<NicDevice>>) -> InProcess {
        InProcess { dev }
    }

    /// The device model itself, e.g. to offer it packets.
    pub fn model(&self) -> MutexGuard<'_, NicDevice> {
        // A panic while holding the lock leaves a device mid-update; the model's state
        // is still memory-safe, so keep serving it (as hardware would) rather than abort.
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.dev.lock().unwrap_or_else(|e| e.into_inner()).detach();
    }
}

impl Device for InProcess {
    fn describe(&self) -> String {
        "in-process".into()
    }

    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.model()
            .region_read(region, offset, buf)
            .map_err(|e| DeviceError::Refused(e.to_string()))
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.model()
            .region_write(region, offset, data)
            .map_err(|e| DeviceError::Refused(e.to_string()))
    }

    fn dma_map(&mut self, iova: u64, mem: &SharedMemory) -> Result<(), DeviceError> {
        let io = |source| DeviceError::Io {
            op: format!("DMA map at {iova:#x}"),
            source,
        };
        let map = Mapping::new(mem.fd(), 0, mem.len()).map_err(io)?;
        self.model().dma_map(iova, map).map_err(io)
    }

    fn dma_unmap(&mut self, iova: u64, len: u64) -> Result<(), DeviceError> {
        self.model().dma_unmap(iova, len);
        Ok(())
    }

    fn set_irq(&mut self, vector: u32, fd: &EventFd) -> Result<(), DeviceError> {
        let fd = fd.try_clone().map_err(|source| DeviceError::Io {
            op: "duplicate eventfd".into(),
            source,
        })?;
        self.model()
            .set_irq(vector, Some(fd))
            .map_err(DeviceError::Refused)
    }
}

impl<T: Device + ?Sized> Device for Box<T> {
    fn describe(&self) -> String {
        (**self).describe()
    }

    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        (**self).region_read(region, offset, buf)
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        (**self).region_write(region, offset, data)
    }

    fn dma_map(&mut self, iova: u64, mem: &SharedMemory) -> Result<(), DeviceError> {
        (**self).dma_map(iova, mem)
    }

    fn dma_unmap(&mut self, iova: u64, len: u64) -> Result<(), DeviceError> {
        (**self).dma_unmap(iova, len)
    }

    fn set_irq(&mut self, vector: u32, fd: &EventFd) -> Result<(), DeviceError> {
        (**self).set_irq(vector, fd)
    }
}

/// The emulated NIC in another process (`flowshard nic-sim --socket PATH`), reached
/// over vfio-user with rust-vmm's client.
///
/// `vfio_user` 0.1.7's client takes every reply for a success, so this backend checks
/// region bounds itself (against the region table the server sent at connect) before
/// it sends an access, and the device reports DMA problems through its own registers
/// (ring errors, flash DMA faults), which the driver reads.
pub struct VfioUser {
    client: vfio_user::Client,
    path: std::path::PathBuf,
}

impl std::fmt::Debug for VfioUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUser")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl VfioUser {
    pub fn connect(path: &std::path::Path) -> Result<VfioUser, DeviceError> {
        let client = vfio_user::Client::new(path).map_err(|e| {
            DeviceError::Refused(format!(
                "vfio-user:{}: {e} (is `flowshard nic-sim --socket {}` running?)",
                path.display(),
                path.display()
            ))
        })?;
        Ok(VfioUser {
            client,
            path: path.to_owned(),
        })
    }

    fn check(&self, region: u32, offset: u64, len: usize) -> Result<(), DeviceError> {
        let size = self.client.region(region).map_or(0, |r| r.size);
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(DeviceError::Refused(format!(
                "region {region}: {len} bytes at {offset:#x} are outside the region ({size} bytes)"
            )));
        }
        Ok(())
    }

    fn fail(&self, op: &str, e: vfio_user::Error) -> DeviceError {
        DeviceError::Refused(format!("{op}: {e}"))
    }
}

impl Device for VfioUser {
    fn describe(&self) -> String {
        format!("vfio-user:{}", self.path.display())
    }

    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check(region, offset, buf.len())?;
        self.client
            .region_read(region, offset, buf)
            .map_err(|e| self.fail("region read", e))
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.check(region, offset, data.len())?;
        self.client
            .region_write(region, offset, data)
            .map_err(|e| self.fail("region write", e))
    }

    fn dma_map(&mut self, iova: u64, mem: &SharedMemory) -> Result<(), DeviceError> {
        use std::os::fd::AsRawFd;
        self.client
            .dma_map(0, iova, mem.len() as u64, mem.fd().as_raw_fd())
            .map_err(|e| self.fail("DMA map", e))
    }

    fn dma_unmap(&mut self, iova: u64, len: u64) -> Result<(), DeviceError> {
        self.client
            .dma_unmap(iova, len)
            .map_err(|e| self.fail("DMA unmap", e))
    }

    fn set_irq(&mut self, vector: u32, fd: &EventFd) -> Result<(), DeviceError> {
        use std::os::fd::{AsFd, AsRawFd};
        use vfio_bindings::bindings::vfio::{
            VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_MSIX_IRQ_INDEX,
        };
        self.client
            .set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                vector,
                1,
                &[fd.as_fd().as_raw_fd()],
            )
            .map_err(|e| self.fail("set MSI-X vector", e))
    }
}

/// Open the device a `--device` argument names: `vfio-user:PATH` or `pci:DDDD:BB:DD.F`.
pub fn open(spec: &str) -> Result<Box<dyn Device>, DeviceError> {
    if let Some(path) = spec.strip_prefix("vfio-user:") {
        return Ok(Box::new(VfioUser::connect(std::path::Path::new(path))?));
    }
    if let Some(addr) = spec.strip_prefix("pci:") {
        return Ok(Box::new(Vfio::open(addr)?));
    }
    Err(DeviceError::Refused(format!(
        "--device {spec}: expected vfio-user:PATH (a socket of `flowshard nic-sim`) or pci:DDDD:BB:DD.F (a NIC bound to vfio-pci)"
    )))
}

/// A PCI address `DDDD:BB:DD.F` (domain, bus, device, function), checked and in the
/// lower-case form sysfs names devices by.
pub fn parse_pci_address(addr: &str) -> Result<String, DeviceError> {
    let bad = || {
        DeviceError::Refused(format!(
            "pci:{addr}: not a PCI address; expected DDDD:BB:DD.F as `lspci -D` prints it, e.g. 0000:03:00.0"
        ))
    };
    let (dbd, func) = addr.split_once('.').ok_or_else(bad)?;
    let parts: Vec<&str> = dbd.split(':').collect();
    let [domain, bus, dev] = parts.as_slice() else {
        return Err(bad());
    };
    let hex = |s: &str, len: usize, max: u32| {
        (s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
            .filter(|v| *v <= max)
    };
    match (
        hex(domain, 4, 0xffff),
        hex(bus, 2, 0xff),
        hex(dev, 2, 0x1f),
        hex(func, 1, 7),
    ) {
        (Some(d), Some(b), Some(s), Some(f)) => Ok(format!("{d:04x}:{b:02x}:{s:02x}.{f:x}")),
        _ => Err(bad()),
    }
}

/// A flowshard NIC through kernel VFIO (`vfio-ioctls`): the container and group of
/// the device's IOMMU group, BAR0 mapped into this process when the kernel allows it
/// (else read and written through the device file), host memory mapped in the IOMMU,
/// MSI-X vectors to eventfds. The README's "Real hardware" section says how to bind a
/// NIC to vfio-pci and which permissions that needs.
pub struct Vfio {
    // Dropped first: closing the device and container ends the IOMMU mappings before
    // the driver frees the memory behind them.
    device: vfio_ioctls::VfioDevice,
    container: Arc<vfio_ioctls::VfioContainer>,
    addr: String,
    bar0: Option<Mapping>,
    irqs: Vec<vmm_sys_util::eventfd::EventFd>,
}

impl std::fmt::Debug for Vfio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vfio")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Where sysfs lists PCI devices.
const SYSFS_PCI: &str = "/sys/bus/pci/devices";

impl Vfio {
    /// Open the device at PCI address `addr`, checking each step a user can get wrong
    /// (no such device, not bound to vfio-pci, no access to its group) before the
    /// kernel is asked.
    pub fn open(addr: &str) -> Result<Vfio, DeviceError> {
        Vfio::open_in(std::path::Path::new(SYSFS_PCI), addr)
    }

    fn open_in(sysfs: &std::path::Path, addr: &str) -> Result<Vfio, DeviceError> {
        let addr = parse_pci_address(addr)?;
        let refused = |why: String| DeviceError::Refused(format!("pci:{addr}: {why}"));
        let sys = sysfs.join(&addr);
        if !sys.exists() {
            return Err(refused(format!(
                "no such PCI device ({} has no entry; `lspci -D` lists the devices)",
                sysfs.display()
            )));
        }
        let link_name = |link: &str| {
            std::fs::read_link(sys.join(link))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        };
        match link_name("driver") {
            Some(d) if d == "vfio-pci" => {}
            other => {
                return Err(refused(format!(
                    "bound to {}, not vfio-pci; bind it first (README, \"Real hardware\")",
                    other.map_or("no driver".into(), |d| format!("driver {d}"))
                )));
            }
        }
        let group = link_name("iommu_group").ok_or_else(|| {
            refused("has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on)".into())
        })?;
        let group_dev = std::path::Path::new("/dev/vfio").join(&group);
        std::fs::OpenOptions::new().read(true).write(true).open(&group_dev).map_err(|source| DeviceError::Io {
            op: format!("pci:{addr}: open {} (IOMMU group {group}; needs read-write access, README \"Real hardware\")", group_dev.display()),
            source,
        })?;
        let kernel = |what: &str, e: vfio_ioctls::VfioError| refused(format!("{what}: {e}"));
        let container = Arc::new(
            vfio_ioctls::VfioContainer::new(None).map_err(|e| kernel("VFIO container", e))?,
        );
        let ops: Arc<dyn vfio_ioctls::VfioOps> = container.clone();
        let device =
            vfio_ioctls::VfioDevice::new(&sys, ops, false).map_err(|e| kernel("VFIO device", e))?;
        let bar0_size = device.get_region_size(REGION_BAR0);
        if bar0_size < u64::from(hdl_bindings::BAR0_SIZE) {
            return Err(refused(format!(
                "BAR0 is {bar0_size} bytes, smaller than the register map"
            )));
        }
        let mmap_ok = device.get_region_flags(REGION_BAR0)
            & vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP
            != 0;
        let bar0 = if mmap_ok {
            use std::os::fd::{AsRawFd, BorrowedFd};
            // SAFETY: the device fd stays open for as long as `device` lives, which
            // outlives this call; borrowing it only to mmap.
            let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
            let len = usize::try_from(bar0_size).map_err(|_| refused("BAR0 too large".into()))?;
            Some(
                Mapping::new(&fd, device.get_region_offset(REGION_BAR0), len).map_err(
                    |source| DeviceError::Io {
                        op: format!("pci:{addr}: mmap BAR0"),
                        source,
                    },
                )?,
            )
        } else {
            None
        };
        Ok(Vfio {
            device,
            container,
            addr,
            bar0,
            irqs: Vec::new(),
        })
    }

    fn check(&self, region: u32, offset: u64, len: usize) -> Result<(), DeviceError> {
        let size = self.device.get_region_size(region);
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(DeviceError::Refused(format!(
                "pci:{}: region {region}: {len} bytes at {offset:#x} are outside the region ({size} bytes)",
                self.addr
            )));
        }
        Ok(())
    }
}

impl Device for Vfio {
    fn describe(&self) -> String {
        format!("pci:{}", self.addr)
    }

    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check(region, offset, buf.len())?;
        if let (REGION_BAR0, Some(bar)) = (region, &self.bar0) {
            for (i, w) in buf.chunks_mut(4).enumerate() {
                let v = bar
                    .read32_volatile(offset as usize + 4 * i)
                    .ok_or_else(|| {
                        DeviceError::Refused(format!(
                            "BAR0 read at {offset:#x}: registers are aligned 32-bit words"
                        ))
                    })?;
                w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
            }
            return Ok(());
        }
        self.device.region_read(region, buf, offset);
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.check(region, offset, data.len())?;
        if let (REGION_BAR0, Some(bar)) = (region, &self.bar0) {
            for (i, w) in data.chunks(4).enumerate() {
                let word: [u8; 4] = w.try_into().map_err(|_| {
                    DeviceError::Refused(format!(
                        "BAR0 write at {offset:#x}: registers are aligned 32-bit words"
                    ))
                })?;
                if !bar.write32_volatile(offset as usize + 4 * i, u32::from_le_bytes(word)) {
                    return Err(DeviceError::Refused(format!(
                        "BAR0 write at {offset:#x}: registers are aligned 32-bit words"
                    )));
                }
            }
            return Ok(());
        }
        self.device.region_write(region, data, offset);
        Ok(())
    }

    fn dma_map(&mut self, iova: u64, mem: &SharedMemory) -> Result<(), DeviceError> {
        // SAFETY: `mem` is touched only through raw copies (never references), as the
        // IOMMU mapping requires; the driver unmaps before it frees the memory, and
        // dropping this backend closes the container (ending every mapping) first.
        unsafe {
            self.container
                .vfio_dma_map(iova, mem.len(), mem.mapping().as_ptr())
        }
        .map_err(|e| DeviceError::Refused(format!("pci:{}: DMA map at {iova:#x}: {e}", self.addr)))
    }

    fn dma_unmap(&mut self, iova: u64, len: u64) -> Result<(), DeviceError> {
        let len = usize::try_from(len)
            .map_err(|_| DeviceError::Refused(format!("DMA unmap of {len} bytes")))?;
        self.container.vfio_dma_unmap(iova, len).map_err(|e| {
            DeviceError::Refused(format!("pci:{}: DMA unmap at {iova:#x}: {e}", self.addr))
        })
    }

    fn set_irq(&mut self, vector: u32, fd: &EventFd) -> Result<(), DeviceError> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let io = |op: &str, source| DeviceError::Io {
            op: format!("pci:{}: {op}", self.addr),
            source,
        };
        let raw = fd
            .try_clone()
            .map_err(|s| io("duplicate eventfd", s))?
            .into_owned_fd()
            .into_raw_fd();
        // SAFETY: `raw` is a fresh duplicate owned by nothing else; the vmm-sys-util
        // EventFd takes ownership of it.
        let fd = unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(raw) };
        // VFIO enables MSI-X vectors as one contiguous set from 0: keep every vector's
        // eventfd and hand the whole set over again.
        while self.irqs.len() <= vector as usize {
            let spare = vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC)
                .map_err(|s| io("eventfd", s))?;
            self.irqs.push(spare);
        }
        self.irqs[vector as usize] = fd;
        self.device
            .enable_msix(self.irqs.iter().collect())
            .map_err(|e| DeviceError::Refused(format!("pci:{}: enable MSI-X: {e}", self.addr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_checked_and_normalised() {
        assert_eq!(parse_pci_address("0000:03:00.0").unwrap(), "0000:03:00.0");
        assert_eq!(parse_pci_address("0000:AF:1f.7").unwrap(), "0000:af:1f.7");
        for bad in [
            "",
            "03:00.0",
            "0000:03:00",
            "0000:03:20.0",
            "0000:03:00.8",
            "000g:03:00.0",
            "0000:3:00.0",
        ] {
            let e = parse_pci_address(bad).unwrap_err().to_string();
            assert!(e.contains("not a PCI address"), "{bad}: {e}");
        }
        let Err(e) = open("tcp:1.2.3.4") else {
            panic!("opened a tcp: device")
        };
        let e = e.to_string();
        assert!(e.contains("expected vfio-user:PATH"), "{e}");
    }

    /// A sysfs tree as the kernel lays it out for one PCI device.
    fn fake_sysfs(driver: Option<&str>, group: Option<&str>) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("0000:03:00.0");
        std::fs::create_dir(&dev).unwrap();
        if let Some(d) = driver {
            std::os::unix::fs::symlink(format!("../../../bus/pci/drivers/{d}"), dev.join("driver"))
                .unwrap();
        }
        if let Some(g) = group {
            std::os::unix::fs::symlink(
                format!("../../../kernel/iommu_groups/{g}"),
                dev.join("iommu_group"),
            )
            .unwrap();
        }
        root
    }

    fn open_err(sysfs: &std::path::Path, addr: &str) -> String {
        Vfio::open_in(sysfs, addr).unwrap_err().to_string()
    }

    #[test]
    fn each_setup_mistake_is_named_before_the_kernel_is_asked() {
        let none = fake_sysfs(None, None);
        let e = open_err(none.path(), "0000:04:00.0");
        assert!(e.starts_with("pci:0000:04:00.0: no such PCI device"), "{e}");
        let e = open_err(none.path(), "0000:03:00.0");
        assert!(e.contains("bound to no driver, not vfio-pci"), "{e}");
        let ixgbe = fake_sysfs(Some("ixgbe"), Some("7"));
        let e = open_err(ixgbe.path(), "0000:03:00.0");
        assert!(e.contains("bound to driver ixgbe, not vfio-pci"), "{e}");
        let no_group = fake_sysfs(Some("vfio-pci"), None);
        let e = open_err(no_group.path(), "0000:03:00.0");
        assert!(e.contains("has no IOMMU group"), "{e}");
        // The kernel edge: bound to vfio-pci, but this machine has no /dev/vfio/<group>.
        let bound = fake_sysfs(Some("vfio-pci"), Some("4242"));
        let e = open_err(bound.path(), "0000:03:00.0");
        assert!(
            e.contains("open /dev/vfio/4242 (IOMMU group 4242; needs read-write access"),
            "{e}"
        );
    }

    #[test]
    fn a_real_pci_device_not_bound_to_vfio_is_refused_clearly() {
        let Some(first) = std::fs::read_dir(SYSFS_PCI)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
        else {
            eprintln!("SKIP: no PCI devices visible in {SYSFS_PCI}");
            return;
        };
        let addr = first.file_name().to_string_lossy().into_owned();
        match Vfio::open(&addr) {
            Ok(_) => eprintln!("{addr} is bound to vfio-pci and opened"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.starts_with(&format!("pci:{addr}: ")), "{e}");
                assert!(
                    e.contains("not vfio-pci") || e.contains("/dev/vfio/"),
                    "{e}"
                );
            }
        }
    }
}
