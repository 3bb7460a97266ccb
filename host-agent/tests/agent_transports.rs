//! The agent end to end over both transports, with one scenario and the same
//! assertions: the NIC linked into the test (the agent on a thread, as the in-process
//! `flowshard agent` runs), and the NIC as a separate `flowshard nic-sim --socket`
//! process driven over vfio-user by a separate `flowshard agent` process.
//!
//! Either way the NIC is fed by the same traffic source nic-sim uses (a scripted
//! capture replayed at its own pace) and writes the same decision log, so what the
//! steering did is judged from the NIC's own per-packet decisions: the agent adopts
//! tables it did not write, serves the API and `/metrics`, drains a node (new flows
//! avoid it, established flows stay), restarts and stops without any flow changing
//! node, and the NIC keeps steering with no agent at all.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowshard::agent::Backend;
use flowshard::agent_config::{AgentConfig, Secret};
use flowshard::device::{Device, InProcess, VfioUser};
use flowshard::driver::Nic;
use flowshard::nic_sim::{Pace, Source, TrafficOptions, TrafficSummary};
use hdl_bindings::ring::{CmdDesc, Opcode, Status};
use hw_sim::capture::PcapWriter;
use hw_sim::device::NicDevice;
use hw_sim::generate::{FRAME_LEN, WIRE_LEN, write_frame};
use nic_firmware::LinkType;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_flowshard");
const TOKEN: &str = "test-token-0123456789";

/// Flows that send all the time: one packet every 100 ms each.
const STEADY: u32 = 400;
/// Flows that start one every 5 ms, send three packets 40 ms apart and go quiet.
const FIRST_NEW: u32 = 1_000_000;
const SCRIPT_S: u64 = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    InProcess,
    VfioUser,
}

/// The traffic script as a capture: steady flows throughout, new flows arriving all
/// the time, so any moment of the run has both.
fn write_script(path: &Path) {
    let mut pkts: Vec<(u64, u32)> = Vec::new();
    let ms = 1_000_000u64;
    for f in 0..STEADY {
        let offset = u64::from(f) * 100 * ms / u64::from(STEADY);
        for k in 0..SCRIPT_S * 10 {
            pkts.push((offset + k * 100 * ms, f));
        }
    }
    for j in 0..(SCRIPT_S * 200) as u32 {
        for k in 0..3 {
            pkts.push((u64::from(j) * 5 * ms + k * 40 * ms, FIRST_NEW + j));
        }
    }
    pkts.sort_unstable();
    let file = std::fs::File::create(path).unwrap();
    let mut w = PcapWriter::new(BufWriter::new(file), LinkType::Ethernet).unwrap();
    let mut frame = [0u8; FRAME_LEN];
    for (ts, f) in pkts {
        write_frame(f, &mut frame);
        // Capture time starts at 1 s: a zero timestamp reads as "none" in some tools.
        w.write(1_000_000_000 + ts, &frame, WIRE_LEN).unwrap();
    }
    w.flush().unwrap();
}

/// The NIC under test with its traffic running, however it is reached.
struct Rig {
    dir: tempfile::TempDir,
    decisions: PathBuf,
    nic: NicKind,
}

enum NicKind {
    InProcess {
        model: Arc<Mutex<NicDevice>>,
        stop: Arc<AtomicBool>,
        traffic: std::thread::JoinHandle<Result<TrafficSummary, flowshard::Error>>,
    },
    Separate {
        sim: Reaped,
        socket: PathBuf,
    },
}

/// A child process killed when dropped, so a failing test leaves no process behind
/// (holding the harness's output open).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGTERM, as systemd stops a service; then wait for the exit.
fn terminate(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    child.wait().unwrap()
}

impl Rig {
    fn start(transport: Transport) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script.pcap");
        write_script(&script);
        let decisions = dir.path().join("decisions.csv");
        let nic = match transport {
            Transport::InProcess => {
                let model = Backend::emulated_nic(&AgentConfig::default()).unwrap();
                let stop = Arc::new(AtomicBool::new(false));
                let opts = TrafficOptions {
                    source: Source::Pcap {
                        path: script,
                        pace: Pace::Captured { speed: 1.0 },
                        loops: 1,
                    },
                    decisions: Some(decisions.clone()),
                    node_pcap_dir: None,
                };
                let (m, s) = (model.clone(), stop.clone());
                let traffic =
                    std::thread::spawn(move || flowshard::nic_sim::run_traffic(&m, &opts, &s));
                NicKind::InProcess {
                    model,
                    stop,
                    traffic,
                }
            }
            Transport::VfioUser => {
                let image = dir.path().join("nic.img");
                std::fs::write(&image, flowshard::nic_cmd::default_image().unwrap()).unwrap();
                let socket = dir.path().join("nic.sock");
                let sim = Command::new(BIN)
                    .arg("nic-sim")
                    .arg("--socket")
                    .arg(&socket)
                    .arg("--image")
                    .arg(&image)
                    .arg("--pcap")
                    .arg(&script)
                    .arg("--decisions")
                    .arg(&decisions)
                    .arg("--json")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let sim = Reaped(sim);
                let deadline = Instant::now() + Duration::from_secs(10);
                while !socket.exists() {
                    assert!(Instant::now() < deadline, "nic-sim never made its socket");
                    std::thread::sleep(Duration::from_millis(10));
                }
                NicKind::Separate { sim, socket }
            }
        };
        Rig {
            dir,
            decisions,
            nic,
        }
    }

    /// A driver connection of the test's own; only while no agent is connected (a
    /// vfio-user server takes one client at a time).
    fn driver(&self) -> Nic<Box<dyn Device>> {
        let dev: Box<dyn Device> = match &self.nic {
            NicKind::InProcess { model, .. } => Box::new(InProcess::new(model.clone())),
            NicKind::Separate { socket, .. } => Box::new(VfioUser::connect(socket).unwrap()),
        };
        let mut nic = Nic::open(dev).unwrap();
        nic.setup_commands(4).unwrap();
        nic
    }

    fn config(&self) -> AgentConfig {
        let mut c = AgentConfig {
            token: Some(Secret::new(TOKEN)),
            tick_ms: 20,
            down_after_ms: 600_000,
            ..AgentConfig::default()
        };
        match &self.nic {
            // The test's traffic replaces the agent's synthetic traffic.
            NicKind::InProcess { .. } => {
                c.emulated.flows = 1;
                c.emulated.new_flows_per_tick = 0;
                c.emulated.packets_per_tick = 0;
            }
            NicKind::Separate { socket, .. } => {
                c.device = flowshard::agent_config::DeviceSpec::VfioUser(socket.clone());
            }
        }
        c.validate().unwrap();
        c
    }

    fn start_agent(&self) -> Agent {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let (url, run) = match &self.nic {
            NicKind::InProcess { model, .. } => {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.set_nonblocking(true).unwrap();
                let url = format!("http://{}", listener.local_addr().unwrap());
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let (cfg, model) = (self.config(), model.clone());
                let thread = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                        let shutdown = async {
                            let _ = stopped.await;
                        };
                        let backend = Backend::InProcess(model);
                        flowshard::daemon::run(cfg, backend, listener, shutdown).await
                    })
                });
                (url, Run::Thread { stop, thread })
            }
            NicKind::Separate { .. } => {
                let path = self.dir.path().join("agent.toml");
                std::fs::write(&path, config_toml(&self.config())).unwrap();
                let mut child = Reaped(
                    Command::new(BIN)
                        .args(["agent", "--listen", "127.0.0.1:0", "--log-json", "--config"])
                        .arg(&path)
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap(),
                );
                let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
                let addr = loop {
                    let line = lines.next().expect("agent exited before serving").unwrap();
                    let v: Value = serde_json::from_str(&line).expect("log lines are JSON");
                    if let Some(a) = v["fields"]["addr"].as_str() {
                        break a.to_string();
                    }
                };
                // Keep reading, so the agent never blocks on a full pipe.
                let logs = std::thread::spawn(move || lines.map_while(Result::ok).collect());
                (format!("http://{addr}"), Run::Process { child, logs })
            }
        };
        let agent = Agent { url, http, run };
        agent.wait_for(|s| s["image_version"] == 1);
        agent
    }

    /// Stop the traffic, then the NIC; the decision log as rows.
    fn finish(self) -> Vec<Row> {
        match self.nic {
            NicKind::InProcess {
                stop,
                traffic,
                model,
            } => {
                stop.store(true, Ordering::SeqCst);
                let s = traffic.join().unwrap().unwrap();
                assert!(s.packets > 0 && s.forwarded == s.packets, "{s:?}");
                drop(model);
            }
            NicKind::Separate { mut sim, .. } => {
                let status = terminate(&mut sim.0);
                assert!(status.success(), "nic-sim: {status}");
            }
        }
        read_decisions(&self.decisions)
    }
}

/// The agent configuration as a file, for the `flowshard agent` process.
fn config_toml(c: &AgentConfig) -> String {
    format!(
        "device = \"{}\"\ntoken = \"{TOKEN}\"\ntick_ms = {}\ndown_after_ms = {}\n",
        c.device, c.tick_ms, c.down_after_ms
    )
}

enum Run {
    Thread {
        stop: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::JoinHandle<Result<(), flowshard::Error>>,
    },
    Process {
        child: Reaped,
        logs: std::thread::JoinHandle<Vec<String>>,
    },
}

/// A running agent and its API.
struct Agent {
    url: String,
    http: ureq::Agent,
    run: Run,
}

impl Agent {
    fn get(&self, path: &str) -> Value {
        let mut resp = self.http.get(format!("{}{path}", self.url)).call().unwrap();
        assert_eq!(resp.status().as_u16(), 200, "GET {path}");
        resp.body_mut().read_json().unwrap()
    }

    fn text(&self, path: &str) -> String {
        let mut resp = self.http.get(format!("{}{path}", self.url)).call().unwrap();
        resp.body_mut().read_to_string().unwrap()
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let mut resp = self
            .http
            .post(format!("{}{path}", self.url))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .send_json(body)
            .unwrap();
        (resp.status().as_u16(), resp.body_mut().read_json().unwrap())
    }

    /// Poll `/status` until `ok` holds (the loop publishes every tick).
    fn wait_for(&self, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut r) = self.http.get(format!("{}/status", self.url)).call()
                && let Ok(v) = r.body_mut().read_json::<Value>()
                && ok(&v)
            {
                return v;
            }
            assert!(Instant::now() < deadline, "agent status never got there");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop as operators do: the shutdown signal in-process, SIGTERM to a process.
    fn stop(self) {
        match self.run {
            Run::Thread { stop, thread } => {
                let _ = stop.send(());
                thread.join().unwrap().unwrap();
            }
            Run::Process { mut child, logs } => {
                let status = terminate(&mut child.0);
                let logs = logs.join().unwrap();
                assert!(status.success(), "agent: {status}: {logs:?}");
                assert!(logs.iter().any(|l| l.contains("SIGTERM")), "{logs:?}");
                assert!(
                    logs.iter().any(|l| l.contains("keeps steering")),
                    "{logs:?}"
                );
            }
        }
    }
}

/// One packet of the decision log: NIC time, flow (client address and port), node.
#[derive(Debug)]
struct Row {
    ts_ns: u64,
    flow: (String, u16),
    node: u16,
    verdict: String,
}

fn read_decisions(path: &Path) -> Vec<Row> {
    let mut r = csv::Reader::from_path(path).unwrap();
    let h = r.headers().unwrap().clone();
    let col = |name: &str| h.iter().position(|c| c == name).unwrap();
    let (ts, src, sport, node, verdict) = (
        col("ts_ns"),
        col("src"),
        col("sport"),
        col("node"),
        col("verdict"),
    );
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            Row {
                ts_ns: rec[ts].parse().unwrap(),
                flow: (rec[src].to_string(), rec[sport].parse().unwrap()),
                node: rec[node].parse().unwrap(),
                verdict: rec[verdict].to_string(),
            }
        })
        .collect()
}

fn placement(shards: &Value) -> Vec<u16> {
    shards
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["node"].as_u64().unwrap() as u16)
        .collect()
}

fn nic_time(v: &Value) -> u64 {
    v["nic_time_ns"].as_u64().unwrap()
}

/// The whole life of an agent against one NIC with traffic flowing throughout.
fn lifecycle(transport: Transport) {
    let rig = Rig::start(transport);

    // Steering the agent did not write: shard 5 moved by hand. The agent must adopt it.
    let mut nic = rig.driver();
    let before = nic.read_tables().unwrap();
    let to = (before.shard_node[5] + 1) % 4;
    let s = nic
        .submit(&[CmdDesc::new(Opcode::SetShardNode, 5, to.into())])
        .unwrap();
    assert_eq!(s, vec![Status::Ok]);
    let adopted = nic.read_tables().unwrap();
    assert_eq!(adopted.shard_node[5], to);
    drop(nic);

    let first = rig.start_agent();
    let s = first.wait_for(|s| {
        s["tracked_flows"].as_u64() > Some(100) && s["loop"]["ticks"].as_u64() > Some(5)
    });
    let device = match transport {
        Transport::InProcess => "in-process".to_string(),
        Transport::VfioUser => format!("vfio-user:{}", rig.dir.path().join("nic.sock").display()),
    };
    assert_eq!(s["device"], device.as_str());
    assert_eq!(
        (s["nodes"].as_u64(), s["shards"].as_u64()),
        (Some(4), Some(64))
    );
    assert_eq!(
        placement(&first.get("/shards")),
        adopted.shard_node,
        "the agent did not adopt the NIC's tables"
    );
    assert_eq!(first.get("/migrations"), json!([]));
    let nodes = first.get("/nodes");
    let packets: u64 = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["packets"].as_u64().unwrap())
        .sum();
    assert!(
        packets > 0,
        "no counter snapshot reached the agent: {nodes}"
    );
    let top = first.get("/flows?top=3");
    let top = top.as_array().unwrap();
    assert_eq!(top.len(), 3);
    assert!(top[0]["client"].as_str().unwrap().starts_with("10."));
    assert_eq!(top[0]["ipv6"], false);
    let metrics = first.text("/metrics");
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    for family in [
        "flowshard_node_packets_total{node=\"1\"}",
        "flowshard_ring_occupancy",
        "flowshard_loop_duration_seconds_count",
    ] {
        assert!(metrics.contains(family), "no {family} in\n{metrics}");
    }

    // Drain node 1: its shards go to the others in one batch.
    let on1 = placement(&first.get("/shards"))
        .iter()
        .filter(|n| **n == 1)
        .count();
    let (code, r) = first.post("/nodes/1/drain", json!({}));
    assert_eq!(code, 200, "{r}");
    let moved = r["migrations"].as_array().unwrap();
    assert_eq!(moved.len(), on1);
    assert!(moved.iter().all(|m| m["from"] == 1 && m["to"] != 1));
    // Every packet after this NIC time met the committed drain.
    let drained_at = nic_time(&first.get("/status"));
    first.wait_for(|s| nic_time(s) > drained_at + 1_000_000_000);
    let drained = placement(&first.get("/shards"));
    assert!(!drained.contains(&1));
    let ticks = first.get("/status")["loop"].clone();
    eprintln!("{transport:?}: last tick {ticks}");
    first.stop();

    // No agent for a while: the NIC steers alone. Then a second agent adopts the tables.
    std::thread::sleep(Duration::from_millis(300));
    let second = rig.start_agent();
    second.wait_for(|s| s["loop"]["ticks"].as_u64() > Some(10));
    assert_eq!(placement(&second.get("/shards")), drained);
    assert_eq!(
        second.get("/migrations"),
        json!([]),
        "the restart moved shards"
    );
    assert_eq!(second.get("/nodes")[1]["state"], "draining");
    second.stop();

    // Fail-static: the tables the agents left, and new flows still avoiding node 1.
    let mut nic = rig.driver();
    let left = nic.read_tables().unwrap();
    assert_eq!(left.shard_node, drained);
    assert_eq!(left.bucket_shard, adopted.bucket_shard);
    assert!(
        left.nodes
            .iter()
            .any(|n| n.id == 1 && n.state == nic_firmware::config::NodeState::Draining)
    );
    let stopped_at = nic.status().unwrap().nic_time_ns;
    let deadline = Instant::now() + Duration::from_secs(20);
    while nic.status().unwrap().nic_time_ns < stopped_at + 500_000_000 {
        assert!(Instant::now() < deadline, "traffic stopped flowing");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(nic);
    let rows = rig.finish();

    assert!(rows.iter().all(|r| r.verdict == "forward"));
    let mut flows: HashMap<&(String, u16), (u64, u16, u64)> = HashMap::new();
    for r in &rows {
        let f = flows.entry(&r.flow).or_insert((r.ts_ns, r.node, r.ts_ns));
        assert_eq!(
            f.1, r.node,
            "flow {:?} moved from node {} to {} at NIC time {}",
            r.flow, f.1, r.node, r.ts_ns
        );
        f.2 = r.ts_ns;
    }
    let stayed = flows
        .values()
        .filter(|(first, node, last)| *node == 1 && *first < drained_at && *last > drained_at)
        .count();
    assert!(
        stayed >= 50,
        "{stayed} flows of node 1 sent after the drain"
    );
    let new_after = |t: u64| flows.values().filter(move |f| f.0 > t);
    assert!(new_after(drained_at).count() >= 100);
    assert!(
        new_after(drained_at).all(|f| f.1 != 1),
        "a new flow went to the draining node"
    );
    assert!(new_after(stopped_at).count() >= 50);
    assert!(new_after(stopped_at).all(|f| f.1 != 1));
    let before_drain = flows.values().filter(|f| f.0 < drained_at && f.1 == 1);
    assert!(before_drain.count() > 0, "node 1 never took a flow");
}

#[test]
fn the_agent_in_process_adopts_drains_restarts_and_stops_without_moving_a_flow() {
    lifecycle(Transport::InProcess);
}

#[test]
fn the_agent_over_vfio_user_adopts_drains_restarts_and_stops_without_moving_a_flow() {
    lifecycle(Transport::VfioUser);
}
