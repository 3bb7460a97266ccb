//! The emulated NIC: traffic sources and the glue that feeds them through the
//! `nic-firmware` data plane, so flowshard can be exercised without hardware.

pub mod capture;
pub mod generate;
pub mod memory;
