//! The host↔NIC interface of flowshard, defined once and used by both sides.
//!
//! This crate holds the wire layouts that travel between the NIC and the host agent.
//! Today that is the flow feature record of the telemetry ring ([`telemetry`]); the
//! register map (SystemRDL), the command/completion descriptors and the image format
//! join it as the emulated NIC grows its PCI interface.
#![no_std]
#![deny(unsafe_code)]

pub mod telemetry;
