//! The emulated NIC: a PCI function running the `nic-firmware` data plane, and the
//! traffic sources that feed it, so flowshard can be exercised without hardware.
//!
//! - [`device`]: the device model (BAR0 registers, command and telemetry rings, flash).
//! - [`dma`]: host memory shared with the device, and interrupts as eventfds.
//! - [`image`]: firmware images (build, sign, verify).
//! - [`flash_store`]: the flash slots as files, kept across restarts.
//! - [`vfio_user_server`]: the device served over vfio-user on a UNIX socket.
//! - [`capture`], [`generate`]: traffic sources.

pub mod capture;
pub mod device;
pub mod dma;
pub mod flash_store;
pub mod generate;
pub mod image;
pub mod memory;
pub mod vfio_user_server;
