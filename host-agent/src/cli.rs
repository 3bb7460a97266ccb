//! The `flowshard` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{Error, bench, forecast_csv, nic_config, replay};

/// Predictive flow sharding on a programmable NIC.
#[derive(Debug, Parser)]
#[command(name = "flowshard", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Push every packet of a pcap/pcapng capture through the NIC data plane.
    Replay {
        /// Capture to replay (pcap or pcapng).
        #[arg(long)]
        pcap: PathBuf,
        /// Data-plane configuration (TOML); the embedded default without it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Write one CSV row per packet with the NIC's decision.
        #[arg(long)]
        decisions: Option<PathBuf>,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Forecast a load series from a CSV file, or backtest the models on it.
    Forecast {
        /// CSV with a header; the first column is a timestamp or an index.
        #[arg(long)]
        csv: PathBuf,
        /// Column to forecast (the last column without it).
        #[arg(long)]
        value_column: Option<String>,
        /// Seasonal periods in rows, comma-separated (detected without it).
        #[arg(long, value_delimiter = ',')]
        period: Vec<usize>,
        /// Rows to forecast past the end of the series.
        #[arg(long)]
        horizon: usize,
        /// Level of the prediction intervals.
        #[arg(long, default_value_t = 0.95)]
        level: f64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Instead of forecasting, print each model's MASE and sMAPE over the last N
        /// rows (rolling origins every `--horizon` rows).
        #[arg(long, value_name = "N")]
        backtest: Option<usize>,
    },
    /// Measure parts of the product.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The data plane's fast path on synthetic 64-byte TCP frames.
    Dataplane {
        /// Active flows (the connection table is filled with them first).
        #[arg(long, default_value_t = 1_000_000)]
        flows: u32,
        /// Packets to measure.
        #[arg(long, default_value_t = 20_000_000)]
        packets: u64,
        /// Zipf exponent of flow popularity (uniform without it).
        #[arg(long)]
        zipf: Option<f64>,
        /// Seed of the synthetic traffic.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Replay {
            pcap,
            config,
            decisions,
            json,
        } => {
            let config = nic_config::load(config.as_deref())?;
            replay::run(&pcap, config, decisions.as_deref(), json)
        }
        Command::Forecast {
            csv,
            value_column,
            period,
            horizon,
            level,
            json,
            backtest,
        } => forecast_csv::run(&forecast_csv::Options {
            csv,
            value_column,
            periods: period,
            horizon,
            level,
            json,
            backtest,
        }),
        Command::Bench {
            what:
                BenchCommand::Dataplane {
                    flows,
                    packets,
                    zipf,
                    seed,
                    json,
                },
        } => {
            let r = bench::dataplane(flows, packets, zipf, seed)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&r).map_err(|e| Error::Usage(e.to_string()))?
                );
            } else {
                println!(
                    "dataplane: {} flows, {} packets, {}\n  {:.2} ns/packet, {:.2} Mpps\n  connection table: {} B/entry, {:.1} B/flow of capacity ({} flows, {:.1} MiB)",
                    r.flows,
                    r.packets,
                    r.popularity,
                    r.ns_per_packet,
                    r.mpps,
                    r.entry_bytes,
                    r.bytes_per_flow,
                    r.table_capacity,
                    r.table_bytes as f64 / (1 << 20) as f64
                );
            }
            Ok(())
        }
    }
}
