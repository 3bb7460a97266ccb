//! The `flowshard` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::agent_config::{self, LogFormat};
use crate::{Error, agent_bench, bench, daemon, nic_cmd, nic_config, replay, top};

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
    /// Build, inspect and sign NIC firmware images.
    Image {
        #[command(subcommand)]
        what: ImageCommand,
    },
    /// Run the agent daemon: control loop, HTTP API, Prometheus metrics. Without a
    /// config it drives an in-process emulated NIC with synthetic traffic.
    Agent {
        /// Agent configuration (TOML); see flowshard.agent.example.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address of the API, overriding `listen` (default 127.0.0.1:9477).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Log as JSON lines instead of human-readable text.
        #[arg(long)]
        log_json: bool,
    },
    /// Live view of a running agent: nodes, shards, classes, migrations.
    Top {
        /// The agent's API.
        #[arg(long, default_value = "http://127.0.0.1:9477")]
        agent: String,
        /// Print one frame (the agent's status) and exit.
        #[arg(long)]
        once: bool,
        /// Refresh period.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Measure parts of the product.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build an image from a data-plane configuration (the embedded default without
    /// one), signed with the development key unless --key or --unsigned is given.
    Build {
        /// Data-plane configuration (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Image version the NIC reports once it runs the image.
        #[arg(long, default_value_t = 1)]
        image_version: u32,
        /// ed25519 private key, PKCS#8 PEM (`openssl genpkey -algorithm ed25519`).
        #[arg(long, conflicts_with = "unsigned")]
        key: Option<PathBuf>,
        /// Leave the image unsigned (for signing later with `image sign`).
        #[arg(long)]
        unsigned: bool,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Check an image's integrity and show what it holds.
    Inspect {
        image: PathBuf,
        /// ed25519 public key, SPKI PEM: also check the signature against it.
        #[arg(long)]
        trusted_key: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Sign an image with an ed25519 key, replacing any signature it has.
    Sign {
        /// ed25519 private key, PKCS#8 PEM.
        #[arg(long)]
        key: PathBuf,
        image: PathBuf,
        /// Write the signed image here instead of replacing IMAGE.
        #[arg(short, long)]
        output: Option<PathBuf>,
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
    /// The agent's memory and control-loop time with many tracked flows.
    Agent {
        /// Flows the agent tracks.
        #[arg(long, default_value_t = 1_000_000)]
        flows: u32,
        /// Ticks to time once every flow is tracked.
        #[arg(long, default_value_t = 200)]
        ticks: u32,
        /// Packets of established flows offered before each tick.
        #[arg(long, default_value_t = 100_000)]
        packets_per_tick: u32,
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
        Command::Agent {
            config,
            listen,
            log_json,
        } => {
            let mut cfg = agent_config::load(config.as_deref())?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if log_json {
                cfg.log_format = LogFormat::Json;
            }
            daemon::main(cfg)
        }
        Command::Top {
            agent,
            once,
            interval_ms,
        } => top::run(
            &agent,
            once,
            std::time::Duration::from_millis(interval_ms.max(100)),
        ),
        Command::Image { what } => match what {
            ImageCommand::Build {
                config,
                image_version,
                key,
                unsigned,
                output,
            } => nic_cmd::build(
                config.as_deref(),
                image_version,
                key.as_deref(),
                unsigned,
                &output,
            ),
            ImageCommand::Inspect {
                image,
                trusted_key,
                json,
            } => nic_cmd::inspect(&image, trusted_key.as_deref(), json),
            ImageCommand::Sign { key, image, output } => {
                nic_cmd::sign(&image, &key, output.as_deref())
            }
        },
        Command::Bench {
            what:
                BenchCommand::Agent {
                    flows,
                    ticks,
                    packets_per_tick,
                    json,
                },
        } => agent_bench::report(flows, ticks, packets_per_tick, json),
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
