//! The flowshard host side: command-line tool today, agent daemon as it grows.
//!
//! - [`nic_config`]: the NIC's data-plane configuration from TOML, with the embedded default.
//! - [`replay`]: push a capture through the emulated NIC's data plane and report.
//! - [`bench`]: the data plane's fast path on synthetic traffic.
//! - [`device`]: the one device interface and its backends (in-process, vfio-user, VFIO).
//! - [`driver`]: the NIC driver over it: block discovery, flash, rings, status.
//! - [`nic_cmd`]: the image and device commands (`image`, `flash`, `status`, `bench ring`).
//! - [`nic_sim`]: `flowshard nic-sim`, the emulated NIC with its traffic sources and outputs.
//! - [`cli`]: the `flowshard` commands.

pub mod bench;
pub mod cli;
pub mod device;
pub mod driver;
pub mod nic_cmd;
pub mod nic_config;
pub mod nic_sim;
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
    Nic(#[from] driver::NicError),
    #[error("{path}: {error}")]
    Image {
        path: std::path::PathBuf,
        error: hdl_bindings::image::ImageError,
    },
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => 64,
            Error::Capture(_) | Error::Io { .. } | Error::Nic(_) | Error::Image { .. } => 1,
        }
    }
}
