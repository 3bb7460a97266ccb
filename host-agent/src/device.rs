//! The one interface the driver talks to a NIC through, and its backends.
//!
//! A [`Device`] is a PCI function as VFIO presents it: regions (BAR0, configuration
//! space) read and written by offset, host memory mapped for DMA, interrupts delivered
//! to eventfds. The driver ([`crate::driver`]) is written once against this trait;
//! the backends are the in-process emulator ([`InProcess`]), the emulator in another
//! process over vfio-user, and a real device through kernel VFIO. Every call returns a
//! `Result`: a transport that fails says so, nothing is swallowed.

use std::sync::{Arc, Mutex, MutexGuard};

use hw_sim::device::{CONFIG_SPACE_LEN, NicDevice};
use hw_sim::dma::{EventFd, Mapping, SharedMemory};

/// VFIO region index of BAR0.
pub const REGION_BAR0: u32 = 0;
/// VFIO region index of the PCI configuration space.
pub const REGION_CONFIG: u32 = 7;

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

/// Serve a region access on a device model: BAR0 as aligned 32-bit registers, the
/// configuration space read-only. Shared by the in-process backend and the vfio-user
/// server, so both present exactly the same device.
pub fn model_region_read(
    dev: &mut NicDevice,
    region: u32,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), DeviceError> {
    match region {
        REGION_BAR0 => {
            check_bar0(offset, buf.len())?;
            for (i, w) in buf.chunks_exact_mut(4).enumerate() {
                w.copy_from_slice(&dev.read(offset as u32 + 4 * i as u32).to_le_bytes());
            }
            Ok(())
        }
        REGION_CONFIG => {
            let cs = dev.config_space();
            let src = usize::try_from(offset)
                .ok()
                .and_then(|o| cs.get(o..o.checked_add(buf.len())?))
                .ok_or_else(|| outside(region, offset, buf.len()))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        _ => Err(outside(region, offset, buf.len())),
    }
}

pub fn model_region_write(
    dev: &mut NicDevice,
    region: u32,
    offset: u64,
    data: &[u8],
) -> Result<(), DeviceError> {
    match region {
        REGION_BAR0 => {
            check_bar0(offset, data.len())?;
            for (i, w) in data.chunks_exact(4).enumerate() {
                let v = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                dev.write(offset as u32 + 4 * i as u32, v);
            }
            Ok(())
        }
        REGION_CONFIG if (offset as usize).saturating_add(data.len()) <= CONFIG_SPACE_LEN => {
            // Configuration writes (command register, BAR sizing) have no effect on an
            // emulated function whose BAR is fixed.
            Ok(())
        }
        _ => Err(outside(region, offset, data.len())),
    }
}

fn check_bar0(offset: u64, len: usize) -> Result<(), DeviceError> {
    let end = offset.checked_add(len as u64);
    if !offset.is_multiple_of(4)
        || !len.is_multiple_of(4)
        || len == 0
        || end.is_none_or(|e| e > hdl_bindings::BAR0_SIZE.into())
    {
        return Err(DeviceError::Refused(format!(
            "BAR0 access of {len} bytes at {offset:#x}: registers are 32-bit aligned words inside {:#x} bytes",
            hdl_bindings::BAR0_SIZE
        )));
    }
    Ok(())
}

fn outside(region: u32, offset: u64, len: usize) -> DeviceError {
    DeviceError::Refused(format!(
        "region {region}: {len} bytes at {offset:#x} are outside the region"
    ))
}

/// The emulated NIC linked into this process. Several handles may share one device
/// (a test drives traffic through one while the driver holds another); dropping a
/// handle that mapped memory detaches it, as a closed vfio-user connection does.
#[derive(Debug)]
pub struct InProcess {
    dev: Arc<Mutex<NicDevice>>,
    mapped: Vec<(u64, u64)>,
}

impl InProcess {
    pub fn new(dev: Arc<Mutex<NicDevice>>) -> InProcess {
        InProcess {
            dev,
            mapped: Vec::new(),
        }
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
        let mut dev = self.dev.lock().unwrap_or_else(|e| e.into_inner());
        for (iova, len) in self.mapped.drain(..) {
            dev.dma_unmap(iova, len);
        }
    }
}

impl Device for InProcess {
    fn describe(&self) -> String {
        "in-process".into()
    }

    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        model_region_read(&mut self.model(), region, offset, buf)
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        model_region_write(&mut self.model(), region, offset, data)
    }

    fn dma_map(&mut self, iova: u64, mem: &SharedMemory) -> Result<(), DeviceError> {
        let io = |source| DeviceError::Io {
            op: format!("DMA map at {iova:#x}"),
            source,
        };
        let map = Mapping::new(mem.fd(), 0, mem.len()).map_err(io)?;
        self.model().dma_map(iova, map).map_err(io)?;
        self.mapped.push((iova, mem.len() as u64));
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, len: u64) -> Result<(), DeviceError> {
        self.model().dma_unmap(iova, len);
        self.mapped.retain(|m| *m != (iova, len));
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
