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
    Err(DeviceError::Refused(format!(
        "--device {spec}: expected vfio-user:PATH (a socket of `flowshard nic-sim`)"
    )))
}
