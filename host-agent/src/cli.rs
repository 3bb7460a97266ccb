//! The `flowshard` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{Error, bench, classify, flows, nic_config, replay};

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
    /// Write the NIC's flow feature records of a capture as CSV: one row per flow with
    /// its tuple, its packets and the profiler's input vector of its first N packets.
    Features {
        /// Capture to read (pcap or pcapng).
        #[arg(long)]
        pcap: PathBuf,
        /// CSV file to write.
        #[arg(long)]
        out: PathBuf,
        /// N: packets the NIC describes one by one in a flow's first record (1-16).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=16))]
        packets: u8,
    },
    /// Classify every flow of a capture: the NIC pipeline with the profiler's tables,
    /// and the profiler model on ONNX Runtime. One row per flow.
    Classify {
        /// Capture to classify (pcap or pcapng).
        #[arg(long)]
        pcap: PathBuf,
        /// ONNX model (the built-in one without it); its NIC tables are read from the
        /// `.trees.json` file beside it, when there is one.
        #[arg(long)]
        model: Option<PathBuf>,
        /// One JSON object per flow and line.
        #[arg(long)]
        json: bool,
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
        Command::Features { pcap, out, packets } => {
            let flows = flows::write_features(&pcap, &out, packets)?;
            eprintln!("{flows} flows written to {}", out.display());
            Ok(())
        }
        Command::Classify { pcap, model, json } => classify::run(&pcap, model.as_deref(), json),
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
