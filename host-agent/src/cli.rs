//! The `flowshard` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::agent_config::{self, LogFormat};
use crate::planner::Policy;
use crate::{
    Error, agent_bench, bench, classify, daemon, flows, forecast_csv, nic_cmd, nic_config, nic_sim,
    replay, top,
};

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
    /// Build, inspect and sign NIC firmware images.
    Image {
        #[command(subcommand)]
        what: ImageCommand,
    },
    /// Write an image into a NIC's inactive flash slot and boot it.
    Flash {
        /// The NIC: vfio-user:PATH (a `flowshard nic-sim` socket) or pci:DDDD:BB:DD.F (bound to vfio-pci).
        #[arg(long)]
        device: String,
        image: PathBuf,
        /// Bytes per DMA chunk.
        #[arg(long, default_value_t = 64 << 10)]
        chunk_size: usize,
        /// One JSON line per chunk written, then the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a NIC's image, slots, tables, counters and rings.
    Status {
        /// The NIC: vfio-user:PATH or pci:DDDD:BB:DD.F.
        #[arg(long)]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Run the emulated NIC: serve it over vfio-user and/or feed it traffic.
    NicSim(NicSimArgs),
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
        /// The planner's policy, overriding `policy` in the config.
        #[arg(long, value_enum)]
        policy: Option<AgentPolicy>,
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
    /// Run the agent's policies over days of traffic on the emulated NIC, in virtual
    /// time, and compare them (overload, delay, node-hours, migrations, broken flows).
    Simulate {
        /// Scenario TOML (the embedded default without it; `--print-scenario` shows it).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Policy to run, or `all` for the three side by side.
        #[arg(long, default_value = "all")]
        policy: SimPolicy,
        /// Load curve CSV replacing the scenario's (same rules as `forecast --csv`).
        #[arg(long)]
        load_csv: Option<PathBuf>,
        /// Column of `--load-csv` (the last column without it).
        #[arg(long, requires = "load_csv")]
        load_column: Option<String>,
        /// Seconds between the rows of `--load-csv`.
        #[arg(long, requires = "load_csv")]
        load_sample_s: Option<u32>,
        /// Print one JSON object `{"scenario": ..., "policies": {...}}`.
        #[arg(long)]
        json: bool,
        /// Draw load, forecast, capacity and migrations over time (.svg or .png).
        #[arg(long, value_name = "OUT.svg|png")]
        plot: Option<PathBuf>,
        /// Print the embedded default scenario and exit.
        #[arg(long)]
        print_scenario: bool,
    },
    /// Measure parts of the product.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").args(["pcap", "live", "generate_flows"])))]
pub struct NicSimArgs {
    /// Serve the device over vfio-user on this UNIX socket until killed. Without it,
    /// nic-sim runs its traffic source through the image and prints the counters.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Trust images signed by this ed25519 public key (SPKI PEM) instead of the
    /// development key.
    #[arg(long)]
    trusted_key: Option<PathBuf>,
    /// Boot this image at start, as if it had been flashed (without --socket: the
    /// embedded default image unless given).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Keep the flash slots (A/B) and the boot selection in this directory, so a
    /// restarted nic-sim boots what was flashed, as a NIC does after a power cycle.
    /// Files are replaced atomically; a damaged slot falls back to the other one.
    #[arg(long, value_name = "DIR")]
    flash_dir: Option<PathBuf>,
    /// Device memory for the data plane's tables, MiB.
    #[arg(long, default_value_t = 4096)]
    memory_mib: u64,
    /// Replay this capture (pcap or pcapng).
    #[arg(long)]
    pcap: Option<PathBuf>,
    /// Replay pace relative to the capture's own (2.0 = twice as fast).
    #[arg(
        long,
        default_value_t = 1.0,
        requires = "pcap",
        conflicts_with = "fast"
    )]
    speed: f64,
    /// Replay as fast as the device takes packets.
    #[arg(long, requires = "pcap")]
    fast: bool,
    /// Replay the capture this many times (0: until killed); NIC time keeps running on.
    #[arg(long = "loop", default_value_t = 1, requires = "pcap")]
    loops: u64,
    /// Capture live on this network interface (libpcap).
    #[arg(long)]
    live: Option<String>,
    /// Generate synthetic traffic of this many flows.
    #[arg(long)]
    generate_flows: Option<u32>,
    /// Synthetic packets to send.
    #[arg(long, default_value_t = 1_000_000, requires = "generate_flows")]
    generate_packets: u64,
    /// Zipf exponent of synthetic flow popularity (uniform without it).
    #[arg(long, requires = "generate_flows")]
    zipf: Option<f64>,
    /// Packets per second of NIC time of the synthetic traffic.
    #[arg(long, default_value_t = 1_000_000, requires = "generate_flows")]
    pps: u64,
    #[arg(long, default_value_t = 1, requires = "generate_flows")]
    seed: u64,
    /// Write one CSV row per packet with the NIC's decision (as `flowshard replay`).
    #[arg(long)]
    decisions: Option<PathBuf>,
    /// Write node-N.pcap per node into this directory: the packets steered to it.
    #[arg(long)]
    node_pcap: Option<PathBuf>,
    /// Print the traffic summary as one JSON object.
    #[arg(long)]
    json: bool,
}

impl NicSimArgs {
    fn into_options(self) -> Result<nic_sim::NicSimOptions, Error> {
        if !(self.speed > 0.0 && self.speed.is_finite()) {
            return Err(Error::Usage(format!(
                "--speed must be above 0, got {}",
                self.speed
            )));
        }
        let source = match (self.pcap, self.live, self.generate_flows) {
            (Some(path), _, _) => Some(nic_sim::Source::Pcap {
                path,
                pace: if self.fast {
                    nic_sim::Pace::Fast
                } else {
                    nic_sim::Pace::Captured { speed: self.speed }
                },
                loops: self.loops,
            }),
            (None, Some(interface), _) => Some(nic_sim::Source::Live { interface }),
            (None, None, Some(flows)) => Some(nic_sim::Source::Generate {
                flows,
                packets: self.generate_packets,
                zipf: self.zipf,
                seed: self.seed,
                pps: self.pps,
            }),
            (None, None, None) => None,
        };
        if source.is_none() && (self.decisions.is_some() || self.node_pcap.is_some()) {
            return Err(Error::Usage(
                "--decisions and --node-pcap need a traffic source (--pcap, --live or --generate-flows)".into(),
            ));
        }
        Ok(nic_sim::NicSimOptions {
            socket: self.socket,
            trusted_key: self.trusted_key,
            image: self.image,
            flash_dir: self.flash_dir,
            memory_mib: self.memory_mib,
            traffic: source.map(|source| nic_sim::TrafficOptions {
                source,
                decisions: self.decisions,
                node_pcap_dir: self.node_pcap,
            }),
            json: self.json,
        })
    }
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
        /// Include the profiler's trees as the NIC's classifier tables, so it classifies
        /// each flow itself at packet N from boot: the shipped model's without a value,
        /// else a trees file (`models/profiler.trees.json` format).
        #[arg(long, value_name = "TREES", num_args = 0..=1)]
        classifier: Option<Option<PathBuf>>,
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

/// `--policy` of `agent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentPolicy {
    Static,
    Reactive,
    Predictive,
}

impl From<AgentPolicy> for Policy {
    fn from(p: AgentPolicy) -> Policy {
        match p {
            AgentPolicy::Static => Policy::Static,
            AgentPolicy::Reactive => Policy::Reactive,
            AgentPolicy::Predictive => Policy::Predictive,
        }
    }
}

/// `--policy` of `simulate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SimPolicy {
    Static,
    Reactive,
    Predictive,
    All,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Table updates per second through the command ring, and register round trips.
    Ring {
        /// The NIC (vfio-user:PATH or pci:DDDD:BB:DD.F); an in-process emulated NIC without it.
        #[arg(long)]
        device: Option<String>,
        /// Bucket updates to send.
        #[arg(long, default_value_t = 1_000_000)]
        updates: u64,
        /// Descriptors per batch (one epoch each).
        #[arg(long, default_value_t = 1024)]
        batch: u32,
        #[arg(long)]
        json: bool,
    },
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
        /// Time the packets this many times over the same table; report the median
        /// and the best run.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Send about half the packets as replies, server to client (every packet
        /// goes client to server without it).
        #[arg(long)]
        two_way: bool,
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
        Command::Features { pcap, out, packets } => {
            let flows = flows::write_features(&pcap, &out, packets)?;
            eprintln!("{flows} flows written to {}", out.display());
            Ok(())
        }
        Command::Classify { pcap, model, json } => classify::run(&pcap, model.as_deref(), json),
        Command::Agent {
            config,
            listen,
            log_json,
            policy,
        } => {
            let mut cfg = agent_config::load(config.as_deref())?;
            if let Some(p) = policy {
                cfg.policy = p.into();
            }
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
                classifier,
                output,
            } => nic_cmd::build(
                config.as_deref(),
                image_version,
                key.as_deref(),
                unsigned,
                classifier.as_ref().map(|t| t.as_deref()),
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
        Command::Flash {
            device,
            image,
            chunk_size,
            json,
        } => nic_cmd::flash(&device, &image, chunk_size, json),
        Command::Status { device, json } => nic_cmd::status(&device, json),
        Command::NicSim(args) => nic_sim::run(args.into_options()?),
        Command::Bench {
            what:
                BenchCommand::Ring {
                    device,
                    updates,
                    batch,
                    json,
                },
        } => {
            if batch == 0 || batch > 65_536 {
                return Err(Error::Usage(format!(
                    "--batch must be between 1 and 65536, got {batch}"
                )));
            }
            let r = nic_cmd::bench_ring(device.as_deref(), updates, batch)?;
            crate::print_report(&r, json, |r| {
                format!(
                    "ring on {}: {} bucket updates in batches of {}: {:.0} updates/s\n  register access (half a scratch round trip): median {:.2} µs, p99 {:.2} µs over {} round trips",
                    r.device,
                    r.updates,
                    r.batch,
                    r.updates_per_s,
                    r.round_trip_us_median,
                    r.round_trip_us_p99,
                    r.register_round_trips
                )
            })
        }
        Command::Bench {
            what:
                BenchCommand::Agent {
                    flows,
                    ticks,
                    packets_per_tick,
                    json,
                },
        } => agent_bench::report(flows, ticks, packets_per_tick, json),
        Command::Simulate {
            scenario,
            policy,
            load_csv,
            load_column,
            load_sample_s,
            json,
            plot,
            print_scenario,
        } => {
            if print_scenario {
                print!("{}", crate::simulate::DEFAULT_SCENARIO);
                return Ok(());
            }
            let policies = match policy {
                SimPolicy::Static => vec![Policy::Static],
                SimPolicy::Reactive => vec![Policy::Reactive],
                SimPolicy::Predictive => vec![Policy::Predictive],
                SimPolicy::All => Policy::ALL.to_vec(),
            };
            crate::simulate::run(&crate::simulate::Options {
                scenario,
                policies,
                load_csv,
                load_column,
                load_sample_s,
                json,
                plot,
            })
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
                    repeat,
                    two_way,
                    json,
                },
        } => {
            let r = bench::dataplane(flows, packets, zipf, seed, repeat, two_way)?;
            crate::print_report(&r, json, |r| {
                format!(
                    "dataplane: {} flows, {} packets x {} runs, {}{}\n  {:.2} ns/packet, {:.2} Mpps (median); best {:.2} ns/packet, {:.2} Mpps\n  connection table: {} B/entry, {:.1} B/flow of capacity ({} flows, {:.1} MiB)",
                    r.flows,
                    r.packets,
                    r.runs_ns_per_packet.len(),
                    r.popularity,
                    if r.two_way { ", two-way" } else { "" },
                    r.ns_per_packet,
                    r.mpps,
                    r.best_ns_per_packet,
                    r.best_mpps,
                    r.entry_bytes,
                    r.bytes_per_flow,
                    r.table_capacity,
                    r.table_bytes as f64 / (1 << 20) as f64
                )
            })
        }
    }
}
