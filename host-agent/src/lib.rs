//! The flowshard host side: command-line tool today, agent daemon as it grows.
//!
//! - [`nic_config`]: the NIC's data-plane configuration from TOML, with the embedded default.
//! - [`replay`]: push a capture through the emulated NIC's data plane and report.
//! - [`bench`]: the data plane's fast path on synthetic traffic.
//! - [`flows`]: a capture's flows as the NIC reports them, and their feature CSV.
//! - [`profiler`]: the flow profiler on ONNX Runtime, and its trees as NIC tables.
//! - [`classify`]: a capture's flows through the NIC and the profiler.
//! - [`device`]: the one device interface and its backends (in-process, vfio-user, VFIO).
//! - [`driver`]: the NIC driver over it: block discovery, flash, rings, status.
//! - [`nic_cmd`]: the image and device commands (`image`, `flash`, `status`, `bench ring`).
//! - [`nic_sim`]: `flowshard nic-sim`, the emulated NIC with its traffic sources and outputs.
//! - [`forecast`]: load forecasting, the agent's forecast stage (sans-I/O).
//! - [`forecast_csv`]: `flowshard forecast` on a series from a CSV file.
//! - [`cli`]: the `flowshard` commands.
//! - [`agent_config`], [`agent`], [`api`], [`metrics`], [`daemon`], [`top`]: the agent
//!   daemon (`flowshard agent`) — configuration, control loop, HTTP API, Prometheus
//!   metrics, process lifecycle — and its live view (`flowshard top`).

pub mod agent;
pub mod agent_bench;
pub mod agent_config;
pub mod agent_forecast;
pub mod api;
pub mod bench;
pub mod classify;
pub mod cli;
pub mod daemon;
pub mod device;
pub mod driver;
pub mod flows;
pub mod forecast;
pub mod forecast_csv;
pub mod metrics;
pub mod nic_cmd;
pub mod nic_config;
pub mod nic_sim;
pub mod node_metrics;
pub mod planner;
pub mod profiler;
pub mod replay;
pub mod simulate;
pub mod top;

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
    #[error(transparent)]
    Nic(#[from] driver::NicError),
    #[error("{path}: {error}")]
    Image {
        path: std::path::PathBuf,
        error: hdl_bindings::image::ImageError,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Agent(String),
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
            Error::Capture(_)
            | Error::Io { .. }
            | Error::Nic(_)
            | Error::Image { .. }
            | Error::Agent(_)
            | Error::Forecast { .. } => 1,
            // EX_UNAVAILABLE: ONNX Runtime or the model is missing or unusable.
            Error::Profiler(_) => 69,
        }
    }
}

/// Print a command's report: one JSON object with `json`, else the text `text` makes.
pub(crate) fn print_report<T: serde::Serialize>(
    report: &T,
    json: bool,
    text: impl FnOnce(&T) -> String,
) -> Result<(), Error> {
    if json {
        let line = serde_json::to_string(report).map_err(|e| Error::Usage(e.to_string()))?;
        println!("{line}");
    } else {
        println!("{}", text(report));
    }
    Ok(())
}
