//! The flowshard host side: command-line tool today, agent daemon as it grows.
//!
//! - [`nic_config`]: the NIC's data-plane configuration from TOML, with the embedded default.
//! - [`replay`]: push a capture through the emulated NIC's data plane and report.
//! - [`bench`]: the data plane's fast path on synthetic traffic.
//! - [`flows`]: a capture's flows as the NIC reports them, and their feature CSV.
//! - [`profiler`]: the flow profiler on ONNX Runtime, and its trees as NIC tables.
//! - [`classify`]: a capture's flows through the NIC and the profiler.
//! - [`cli`]: the `flowshard` commands.

pub mod bench;
pub mod classify;
pub mod cli;
pub mod flows;
pub mod nic_config;
pub mod profiler;
pub mod replay;

/// Every way a `flowshard` command can fail, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration the product refuses; exits 64 (`EX_USAGE`).
    #[error(transparent)]
    Config(#[from] nic_config::ConfigFileError),
    #[error(transparent)]
    Capture(#[from] hw_sim::capture::CaptureError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Profiler(#[from] profiler::ProfilerError),
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => 64,
            Error::Capture(_) | Error::Io { .. } => 1,
            // EX_UNAVAILABLE: ONNX Runtime or the model is missing or unusable.
            Error::Profiler(_) => 69,
        }
    }
}
