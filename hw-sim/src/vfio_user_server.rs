//! Serve the emulated NIC over vfio-user on a UNIX socket (rust-vmm's `vfio_user`
//! server), one client after another. Device state lives in the shared [`NicDevice`]
//! and outlives connections: flash, then status, then the agent may connect in turn
//! and find tables, counters and flash slots as the previous one left them.
//!
//! The PCI function offers BAR0 ([`BAR0_SIZE`] bytes) and the configuration space,
//! and 2 MSI-X vectors delivered to eventfds. Host memory for rings and flash chunks
//! arrives as file descriptors with DMA_MAP and is mapped into the device's DMA space.
//!
//! One limit of `vfio_user` 0.1.7 shapes this file: its client reads every reply as a
//! success (the error flag of a reply is never looked at, and a region read's error
//! reply is shorter than the data the client then waits for). So this backend answers
//! a region access it cannot serve the way a PCI bus answers an access nobody claims —
//! reads return all ones, writes are dropped — and the driver checks bounds before it
//! sends; the failure is logged here for the operator.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use hdl_bindings::{BAR0_SIZE, IRQ_VECTORS};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE, vfio_region_info,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

use crate::device::{CONFIG_SPACE_LEN, NicDevice, REGION_BAR0, REGION_CONFIG};
use crate::dma::{EventFd, Mapping};

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{path}: a process is already serving on this socket")]
    InUse { path: String },
    #[error("{path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: vfio_user::Error,
    },
    #[error("{path}: remove stale socket: {source}")]
    Stale {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The region table: BAR0 and configuration space readable and writable, the other
/// PCI regions absent.
fn regions() -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = match index {
                REGION_BAR0 => u64::from(BAR0_SIZE),
                REGION_CONFIG => CONFIG_SPACE_LEN as u64,
                _ => 0,
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    index,
                    size,
                    flags: if size > 0 {
                        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
                    } else {
                        0
                    },
                    ..Default::default()
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            count: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                IRQ_VECTORS
            } else {
                0
            },
            flags: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                VFIO_IRQ_INFO_EVENTFD
            } else {
                0
            },
        })
        .collect()
}

/// One connection's view of the shared device.
struct Backend {
    dev: Arc<Mutex<NicDevice>>,
}

impl Backend {
    fn dev(&self) -> MutexGuard<'_, NicDevice> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), io::Error> {
        if let Err(e) = self.dev().region_read(region, offset, data) {
            eprintln!("nic-sim: {e}; read as all ones");
            data.fill(0xff);
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        if let Err(e) = self.dev().region_write(region, offset, data) {
            eprintln!("nic-sim: {e}; write dropped");
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), io::Error> {
        let fd = fd
            .ok_or_else(|| invalid(format!("DMA map at {address:#x} without a file descriptor")))?;
        let len = usize::try_from(size).map_err(|_| invalid(format!("DMA map of {size} bytes")))?;
        let map = Mapping::new(&fd, offset, len)?;
        self.dev()
            .dma_map(address, map)
            .inspect_err(|e| eprintln!("nic-sim: {e}"))
    }

    fn dma_unmap(
        &mut self,
        _flags: DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> Result<(), io::Error> {
        self.dev().dma_unmap(address, size);
        Ok(())
    }

    fn reset(&mut self) -> Result<(), io::Error> {
        self.dev().reset();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), io::Error> {
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            return Err(invalid(format!(
                "IRQ index {index}: the device has MSI-X only"
            )));
        }
        let mut dev = self.dev();
        if flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 {
            if fds.len() != count as usize {
                return Err(invalid(format!(
                    "{count} vectors but {} eventfds",
                    fds.len()
                )));
            }
            for (i, f) in fds.into_iter().enumerate() {
                let fd = if f.as_raw_fd() < 0 {
                    None
                } else {
                    Some(EventFd::from_file(f))
                };
                dev.set_irq(start + i as u32, fd).map_err(invalid)?;
            }
        } else if flags & VFIO_IRQ_SET_DATA_NONE != 0 && count == 0 {
            for v in 0..IRQ_VECTORS {
                dev.set_irq(v, None).map_err(invalid)?;
            }
        }
        Ok(())
    }
}

/// Serve `dev` on `socket` until the process ends, one client at a time. A socket file
/// left by a dead server is replaced; one a live server answers on is refused.
pub fn serve(socket: &Path, dev: Arc<Mutex<NicDevice>>) -> Result<(), ServeError> {
    let path = socket.display().to_string();
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(ServeError::InUse { path });
        }
        std::fs::remove_file(socket).map_err(|source| ServeError::Stale {
            path: path.clone(),
            source,
        })?;
    }
    let server =
        Server::new(socket, true, irqs(), regions()).map_err(|source| ServeError::Socket {
            path: path.clone(),
            source,
        })?;
    let mut backend = Backend { dev };
    loop {
        let result = server.run(&mut backend);
        backend.dev().detach();
        match result {
            Ok(()) => {}
            Err(vfio_user::Error::SocketAccept(source)) => {
                return Err(ServeError::Socket {
                    path,
                    source: vfio_user::Error::SocketAccept(source),
                });
            }
            // A client that misbehaved or died mid-message ends only its connection.
            Err(e) => eprintln!("nic-sim: connection ended: {e}"),
        }
    }
}
