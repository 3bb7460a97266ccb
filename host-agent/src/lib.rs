//! The flowshard host side: command-line tool today, agent daemon as it grows.
//!
//! - [`nic_config`]: the NIC's data-plane configuration from TOML, with the embedded default.
//! - [`replay`]: push a capture through the emulated NIC's data plane and report.
//! - [`bench`]: the data plane's fast path on synthetic traffic.
//! - [`forecast`]: load forecasting, the agent's forecast stage (sans-I/O).
//! - [`forecast_csv`]: `flowshard forecast` on a series from a CSV file.
//! - [`cli`]: the `flowshard` commands.

pub mod bench;
pub mod cli;
pub mod forecast;
pub mod forecast_csv;
pub mod nic_config;
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
    #[error("{0}")]
    Usage(String),
    /// A load series file the forecaster cannot take; exits 64.
    #[error(transparent)]
    Csv(#[from] forecast_csv::CsvError),
    /// A series or request the forecaster refuses (exits 64), or a model failing on it (1).
    #[error("{}: {source}", path.display())]
    Forecast {
        path: std::path::PathBuf,
        #[source]
        source: forecast::ForecastError,
    },
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) | Error::Csv(_) => 64,
            Error::Forecast { source, .. } if source.is_bad_input() => 64,
            Error::Capture(_) | Error::Io { .. } | Error::Forecast { .. } => 1,
        }
    }
}
