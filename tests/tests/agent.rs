//! The agent daemon against the emulated NIC, end to end: it reads the NIC's tables
//! back, serves the API and `/metrics`, drains a node (new flows avoid it, established
//! flows stay until they end), restarts without moving any flow, and leaves the NIC
//! steering when it stops. The test shares the device model with the agent, offers it
//! packets and looks inside it; the agent reaches it through its driver.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowshard::agent::Backend;
use flowshard::agent_config::{AgentConfig, Secret};
use flowshard::planner::Policy;
use hw_sim::device::NicDevice;
use hw_sim::generate::{FRAME_LEN, WIRE_LEN, write_frame};
use nic_firmware::config::NodeState;
use nic_firmware::pipeline::{Decision, Packet};
use nic_firmware::{LinkType, Verdict};
use serde_json::{Value, json};

const TOKEN: &str = "test-token-0123456789";

/// A NIC running the embedded default image: 4 nodes, 64 shards, 65,536 buckets.
fn fresh_nic() -> Arc<Mutex<NicDevice>> {
    Backend::emulated_nic(&AgentConfig::default()).unwrap()
}

/// An agent that offers no traffic of its own: the test does.
fn config(token: Option<&str>) -> AgentConfig {
    let mut c = AgentConfig {
        token: token.map(Secret::new),
        tick_ms: 20,
        down_after_ms: 600_000,
        ..AgentConfig::default()
    };
    c.emulated.flows = 1;
    c.emulated.new_flows_per_tick = 0;
    c.emulated.packets_per_tick = 0;
    c.validate().unwrap();
    c
}

/// A running agent on its own thread and runtime, as `flowshard agent` runs it.
struct Running {
    url: String,
    http: ureq::Agent,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), flowshard::Error>>>,
}

fn start(cfg: AgentConfig, model: Arc<Mutex<NicDevice>>) -> Running {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
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
            flowshard::daemon::run(cfg, Backend::InProcess(model), listener, shutdown).await
        })
    });
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let r = Running {
        url,
        http,
        stop: Some(stop),
        thread: Some(thread),
    };
    r.wait_for(|s| s["image_version"] == 1);
    r
}

impl Running {
    fn get(&self, path: &str) -> (u16, Value) {
        let mut resp = self.http.get(format!("{}{path}", self.url)).call().unwrap();
        (resp.status().as_u16(), resp.body_mut().read_json().unwrap())
    }

    fn text(&self, path: &str) -> (String, String) {
        let mut resp = self.http.get(format!("{}{path}", self.url)).call().unwrap();
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        (ct, resp.body_mut().read_to_string().unwrap())
    }

    fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.send_json(body).unwrap();
        let status = resp.status().as_u16();
        if status == 401 {
            assert!(resp.headers().contains_key("www-authenticate"));
        }
        (status, resp.body_mut().read_json().unwrap())
    }

    /// Poll `/status` until `ok` holds (the loop publishes every tick).
    fn wait_for(&self, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
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

    fn stop(mut self) -> Result<(), flowshard::Error> {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap()
    }
}

/// The test's traffic: synthetic TCP flows at a NIC clock of its own.
struct Wire {
    model: Arc<Mutex<NicDevice>>,
    now_ns: u64,
}

impl Wire {
    /// One packet of each flow (an RST with `rst`), 1 µs apart; the decisions.
    fn send(&mut self, flows: impl Iterator<Item = u32>, rst: bool) -> Vec<Decision> {
        let frames: Vec<[u8; FRAME_LEN]> = flows
            .map(|f| {
                let mut b = [0u8; FRAME_LEN];
                write_frame(f, &mut b);
                if rst {
                    b[47] = 0x14;
                }
                b
            })
            .collect();
        let pkts: Vec<Packet<'_>> = frames
            .iter()
            .map(|d| {
                self.now_ns += 1_000;
                Packet {
                    ts_ns: self.now_ns,
                    data: d,
                    wire_len: WIRE_LEN,
                }
            })
            .collect();
        let mut out = Vec::new();
        let mut dev = self.model.lock().unwrap();
        for burst in pkts.chunks(32) {
            dev.receive(LinkType::Ethernet, burst, &mut out);
        }
        assert!(out.iter().all(|d| d.verdict == Verdict::Forward));
        out
    }

    fn wait(&mut self, ms: u64) {
        self.now_ns += ms * 1_000_000;
    }

    fn nodes(&mut self, flows: std::ops::Range<u32>) -> Vec<u16> {
        self.send(flows, false).iter().map(|d| d.node).collect()
    }

    /// The steering tables inside the device.
    fn tables(&self) -> (Vec<u16>, Vec<u16>, Vec<(u16, NodeState)>) {
        let dev = self.model.lock().unwrap();
        let p = dev.pipeline().unwrap();
        (
            p.bucket_table().to_vec(),
            p.shard_table().to_vec(),
            p.nodes().map(|n| (n.id, n.state)).collect(),
        )
    }
}

fn error(v: &Value) -> &str {
    v["error"].as_str().unwrap()
}

#[test]
fn the_api_serves_the_nics_view_and_guards_every_change() {
    let model = fresh_nic();
    let agent = start(config(Some(TOKEN)), model.clone());
    let mut wire = Wire { model, now_ns: 0 };
    for _ in 0..8 {
        wire.send(0..2_000, false);
        wire.wait(20);
    }
    // Every flow sent its first 8 packets: an early record each, all tracked.
    let s = agent.wait_for(|s| s["tracked_flows"] == 2_000 && s["nic_active_flows"] == 2_000);
    assert_eq!(s["device"], "in-process");
    assert_eq!(
        (s["nodes"].as_u64(), s["shards"].as_u64()),
        (Some(4), Some(64))
    );
    assert_eq!(s["nodes_active"], 4);

    let (code, nodes) = agent.get("/nodes");
    assert_eq!(code, 200);
    let nodes = nodes.as_array().unwrap().clone();
    let flows: u64 = nodes
        .iter()
        .map(|n| n["active_flows"].as_u64().unwrap())
        .sum();
    assert_eq!(flows, 2_000);
    assert!(
        nodes
            .iter()
            .all(|n| n["shards"] == 16 && n["state"] == "active")
    );
    let (_, shards) = agent.get("/shards");
    let buckets: u64 = shards
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["buckets"].as_u64().unwrap())
        .sum();
    assert_eq!(buckets, 65_536);
    let (_, top) = agent.get("/flows?top=5");
    let top = top.as_array().unwrap();
    assert_eq!(top.len(), 5);
    assert!(
        top.windows(2)
            .all(|w| w[0]["bytes"].as_u64() >= w[1]["bytes"].as_u64())
    );
    assert_eq!(top[0]["packets"], 8);
    assert!(top[0]["client"].as_str().unwrap().starts_with("10.0."));
    let (_, fc) = agent.get("/forecast");
    assert_eq!(fc["policy"], "static");
    assert_eq!(fc["nodes"].as_array().unwrap().len(), 4);
    assert_eq!(s["policy"], "static");
    assert_eq!(agent.get("/migrations").1, json!([]));

    // Bad requests: JSON errors with the status code that says whose fault it is.
    let (code, e) = agent.post("/nodes/1/drain", None, json!({}));
    assert_eq!(code, 401);
    assert!(error(&e).contains("Authorization: Bearer"));
    assert_eq!(
        agent
            .post("/nodes/1/drain", Some("wrong-token-0123456789"), json!({}))
            .0,
        401
    );
    let (code, e) = agent.post("/nodes/9/drain", Some(TOKEN), json!({}));
    assert_eq!((code, error(&e)), (404, "no node 9"));
    assert_eq!(agent.post("/nodes/x/drain", Some(TOKEN), json!({})).0, 400);
    let (code, e) = agent.post("/nodes/1/weight", Some(TOKEN), json!({"wieght": 2}));
    assert_eq!(code, 400);
    assert!(error(&e).contains("unknown field `wieght`"), "{e}");
    let (code, e) = agent.post("/nodes/1/weight", Some(TOKEN), json!({"weight": 5_000_000}));
    assert_eq!(code, 422, "{e}");
    let (code, e) = agent.get("/flows?top=0");
    assert_eq!(code, 400);
    assert!(error(&e).contains("top=0"));
    let (code, e) = agent.get("/nope");
    assert_eq!(code, 404);
    assert!(error(&e).contains("no such endpoint"));
    let (code, _) = agent.post("/migrations", Some(TOKEN), json!({"shard": 999, "node": 1}));
    assert_eq!(code, 404);
    let on = wire.tables().1[0];
    let (code, e) = agent.post("/migrations", Some(TOKEN), json!({"shard": 0, "node": on}));
    assert_eq!(code, 409);
    assert!(error(&e).contains("already on node"));

    // An operator's move: committed on the NIC before the call returns.
    let to = (on + 1) % 4;
    let (code, m) = agent.post("/migrations", Some(TOKEN), json!({"shard": 0, "node": to}));
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["migrations"][0]["reason"], "operator");
    assert_eq!(
        (
            m["migrations"][0]["from"].as_u64(),
            m["migrations"][0]["to"].as_u64()
        ),
        (Some(on.into()), Some(to.into()))
    );
    assert_eq!(wire.tables().1[0], to);
    assert_eq!(agent.get("/shards").1[0]["node"], to);

    // A weight: the planner moves the fewest shards to give node 2 its share.
    let (code, m) = agent.post("/nodes/2/weight", Some(TOKEN), json!({"weight": 3}));
    assert_eq!(code, 200, "{m}");
    let shard_node = wire.tables().1;
    let on2 = shard_node.iter().filter(|n| **n == 2).count();
    assert!((32..=33).contains(&on2), "{on2}");
    assert_eq!(m["migrations"].as_array().unwrap().len(), on2 - 16);

    // Metrics: valid OpenMetrics text that agrees with the API.
    let (ct, text) = agent.text("/metrics");
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("invalid exposition: {e:?}\n{text}"));
    for f in [
        "flowshard_node_packets",
        "flowshard_shard_bytes",
        "flowshard_class_flows",
        "flowshard_migrations",
        "flowshard_loop_duration_seconds",
        "flowshard_ring_occupancy",
        "flowshard_telemetry_overflow",
        "flowshard_node_forecast_gbps",
        "flowshard_node_capacity_gbps",
    ] {
        assert!(parsed.families.contains_key(f), "no {f} in\n{text}");
    }
    let n0 = agent.get("/nodes").1[0]["packets"].as_u64().unwrap();
    assert!(
        text.contains(&format!(
            "flowshard_node_packets_total{{node=\"0\"}} {n0}\n"
        )),
        "{text}"
    );
    // The operator's move, and the weight's.
    assert!(text.contains(&format!(
        "flowshard_migrations_total{{reason=\"operator\"}} {}\n",
        1 + on2 - 16
    )));
    promtool_check(&text);

    agent.stop().unwrap();
}

/// `promtool check metrics` where Prometheus' tool is installed.
fn promtool_check(text: &str) {
    use std::io::Write;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed: checked with openmetrics-parser only");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn without_a_token_changes_are_refused_with_how_to_allow_them() {
    let model = fresh_nic();
    let agent = start(config(None), model);
    let (code, e) = agent.post("/nodes/1/drain", Some(TOKEN), json!({}));
    assert_eq!(code, 403);
    assert!(
        error(&e).contains("set `token` in the agent's configuration file"),
        "{e}"
    );
    assert_eq!(agent.get("/nodes").1[1]["state"], "active");
    agent.stop().unwrap();
}

#[test]
fn a_drained_node_keeps_its_flows_until_they_end_and_takes_no_new_ones() {
    let model = fresh_nic();
    let agent = start(config(Some(TOKEN)), model.clone());
    let mut wire = Wire { model, now_ns: 0 };
    let before = wire.nodes(0..3_000);
    let on1: Vec<u32> = (0..3_000).filter(|f| before[*f as usize] == 1).collect();
    assert!(on1.len() > 500);

    let (code, r) = agent.post("/nodes/1/drain", Some(TOKEN), json!({}));
    assert_eq!(code, 200, "{r}");
    let moved = r["migrations"].as_array().unwrap();
    assert_eq!(moved.len(), 16, "node 1's shards go to the active nodes");
    assert!(
        moved
            .iter()
            .all(|m| m["from"] == 1 && m["to"] != 1 && m["reason"] == "operator")
    );
    assert!(wire.tables().2.contains(&(1, NodeState::Draining)));

    wire.wait(10);
    assert_eq!(
        wire.nodes(0..3_000),
        before,
        "established flows stay where they are"
    );
    let new = wire.nodes(100_000..103_000);
    assert!(!new.contains(&1), "new flows avoid the draining node");

    // Node 1's flows end; the same 5-tuples coming back later are new flows.
    wire.send(on1.iter().copied(), true);
    wire.wait(5_000);
    let again = wire.send(on1.iter().copied(), false);
    assert!(again.iter().all(|d| d.new_flow && d.node != 1));

    let (_, nodes) = agent.get("/nodes");
    assert_eq!(
        (nodes[1]["state"].as_str(), nodes[1]["shards"].as_u64()),
        (Some("draining"), Some(0))
    );
    let (code, _) = agent.post("/migrations", Some(TOKEN), json!({"shard": 1, "node": 1}));
    assert_eq!(code, 409, "a draining node takes no shard");

    let (code, _) = agent.post("/nodes/1/up", Some(TOKEN), json!({}));
    assert_eq!(code, 200);
    assert_eq!(wire.tables().1.iter().filter(|n| **n == 1).count(), 16);
    agent.stop().unwrap();
}

#[test]
fn restarting_the_agent_moves_no_flow_and_stopping_it_leaves_the_nic_steering() {
    let model = fresh_nic();
    let mut wire = Wire {
        model: model.clone(),
        now_ns: 0,
    };
    let first = start(config(Some(TOKEN)), model.clone());
    let before = wire.nodes(0..4_000);
    // Operator changes the restart must keep: a moved shard and a draining node.
    let to = (wire.tables().1[5] + 1) % 3;
    assert_eq!(
        first
            .post("/migrations", Some(TOKEN), json!({"shard": 5, "node": to}))
            .0,
        200
    );
    assert_eq!(first.post("/nodes/3/drain", Some(TOKEN), json!({})).0, 200);
    let tables = wire.tables();
    let placement = |v: Value| -> Vec<(u64, u64, u64)> {
        let s = v.as_array().unwrap().iter();
        s.map(|s| {
            (
                s["id"].as_u64().unwrap(),
                s["node"].as_u64().unwrap(),
                s["buckets"].as_u64().unwrap(),
            )
        })
        .collect()
    };
    let shards_view = placement(first.get("/shards").1);
    first.stop().unwrap();

    // Fail-static: with no agent the NIC steers by its last committed tables.
    wire.wait(10);
    assert_eq!(wire.nodes(0..4_000), before);
    assert!(!wire.nodes(200_000..202_000).contains(&3));
    assert_eq!(wire.tables(), tables);

    let second = start(config(Some(TOKEN)), model.clone());
    let s = second.wait_for(|s| s["loop"]["ticks"].as_u64() >= Some(5));
    assert_eq!(s["nodes_draining"], 1);
    assert_eq!(
        wire.tables(),
        tables,
        "the restarted agent changed the NIC's tables"
    );
    assert!(
        placement(second.get("/shards").1) == shards_view,
        "placement changed"
    );
    assert_eq!(second.get("/migrations").1, json!([]));
    assert_eq!(second.get("/nodes").1[3]["state"], "draining");
    wire.wait(10);
    assert_eq!(
        wire.nodes(0..4_000),
        before,
        "a flow changed node across the restart"
    );
    second.stop().unwrap();
}

#[test]
fn a_table_read_aimed_at_unmapped_memory_is_refused_and_changes_nothing() {
    use hdl_bindings::ring::{CmdDesc, Opcode, Status, Table};
    let model = fresh_nic();
    let dev: Box<dyn flowshard::device::Device> =
        Box::new(flowshard::device::InProcess::new(model.clone()));
    let mut nic = flowshard::driver::Nic::open(dev).unwrap();
    nic.setup_commands(4).unwrap();
    let tables = nic.read_tables().unwrap();
    assert_eq!(tables.bucket_shard.len(), 65_536);
    assert_eq!(
        tables.shard_node,
        model.lock().unwrap().pipeline().unwrap().shard_table()
    );
    assert_eq!(tables.nodes.len(), 4);
    let s = nic
        .submit(&[
            CmdDesc::new(Opcode::SetShardNode, 0, 3),
            CmdDesc::read_table(Table::BucketShard, 0x9_0000_0000),
        ])
        .unwrap();
    assert_eq!(s, vec![Status::Aborted, Status::BadArgument]);
    assert_eq!(nic.read_tables().unwrap(), tables);
}

/// A node's Prometheus endpoint serving node_exporter metrics that grow with every
/// scrape (a quarter of the CPU busy, 5 MB more traffic); it answers 503 once
/// `healthy` turns false.
fn node_exporter(healthy: Arc<std::sync::atomic::AtomicBool>) -> String {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut c) = conn else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&buf[..k]),
                }
            }
            let n = n as u64;
            let (status, body) = if healthy.load(Ordering::SeqCst) {
                let body = format!(
                    "# TYPE node_cpu_seconds_total counter\n\
                     node_cpu_seconds_total{{cpu=\"0\",mode=\"idle\"}} {}\n\
                     node_cpu_seconds_total{{cpu=\"0\",mode=\"user\"}} {}\n\
                     # TYPE node_memory_MemTotal_bytes gauge\nnode_memory_MemTotal_bytes 4e9\n\
                     # TYPE node_memory_MemAvailable_bytes gauge\nnode_memory_MemAvailable_bytes 3e9\n\
                     # TYPE node_network_receive_bytes_total counter\n\
                     node_network_receive_bytes_total{{device=\"eth0\"}} {}\n",
                    3 * n,
                    n,
                    5_000_000 * n
                );
                ("200 OK", body)
            } else {
                ("503 Service Unavailable", String::new())
            };
            let _ = write!(
                c,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

#[test]
fn a_node_whose_endpoint_stops_answering_fails_and_the_planner_moves_its_shards() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let healthy = Arc::new(AtomicBool::new(true));
    let url = node_exporter(healthy.clone());
    let mut cfg = config(Some(TOKEN));
    cfg.node_scrape_ms = 50;
    cfg.down_after_ms = 400;
    // Reactive moves a failed node's shards; four nodes kept, so it drains none.
    cfg.policy = Policy::Reactive;
    cfg.planner.min_active = 4;
    cfg.nodes = vec![flowshard::agent_config::NodeSettings {
        id: 2,
        capacity_gbps: 25.0,
        metrics_url: Some(url),
    }];
    cfg.validate().unwrap();
    let model = fresh_nic();
    let agent = start(cfg, model.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    let n2 = loop {
        let n2 = agent.get("/nodes").1[2].clone();
        if n2["cpu_busy"].is_f64() && n2["load_gbps"].as_f64() > Some(0.0) {
            break n2;
        }
        assert!(Instant::now() < deadline, "no load from the endpoint: {n2}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(n2["load_source"], "prometheus");
    assert_eq!(n2["cpu_busy"], 0.25);
    assert_eq!(n2["memory_used"], 0.25);
    assert_eq!(
        (n2["state"].as_str(), n2["capacity_gbps"].as_f64()),
        (Some("active"), Some(25.0))
    );
    let (_, metrics) = agent.text("/metrics");
    openmetrics_parser::openmetrics::parse_openmetrics(&metrics).unwrap();
    promtool_check(&metrics);
    assert!(
        metrics.contains("flowshard_node_cpu_busy_ratio{node=\"2\"} 0.25\n"),
        "{metrics}"
    );
    assert_eq!(agent.get("/nodes").1[0]["load_source"], "nic");

    healthy.store(false, Ordering::SeqCst);
    let s = agent.wait_for(|s| s["nodes_down"] == 1);
    assert_eq!(s["nodes_active"], 3);
    let n2 = agent.get("/nodes").1[2].clone();
    assert_eq!(
        (n2["state"].as_str(), n2["shards"].as_u64()),
        (Some("down"), Some(0))
    );
    let why = n2["down_reason"].as_str().unwrap();
    assert!(
        why.contains("has not answered") && why.contains("503"),
        "{why}"
    );
    let wire = Wire { model, now_ns: 0 };
    let (_, shard_node, nodes) = wire.tables();
    assert!(nodes.contains(&(2, NodeState::Down)) && !shard_node.contains(&2));
    assert_eq!(agent.get("/nodes").1[2]["power"], "failed");
    let (_, moved) = agent.get("/migrations");
    let moved = moved.as_array().unwrap();
    assert_eq!(moved.len(), 16, "{moved:?}");
    for m in moved {
        assert_eq!(
            (m["from"].as_u64(), m["reason"].as_str()),
            (Some(2), Some("failure"))
        );
        assert!(m["duration_ms"].as_f64().unwrap() > 0.0, "{m}");
        assert_eq!(m["flows_handed_off"], 0);
    }
    let (_, decisions) = agent.get("/decisions");
    let d = &decisions.as_array().unwrap()[0];
    assert_eq!(
        (d["applied"].as_bool(), d["policy"].as_str()),
        (Some(true), Some("reactive"))
    );
    assert!(
        d["reasons"][0]
            .as_str()
            .unwrap()
            .contains("node 2 stopped answering")
    );
    let (_, text) = agent.text("/metrics");
    openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap();
    promtool_check(&text);
    for line in [
        "flowshard_migrations_total{reason=\"failure\"} 16\n",
        "flowshard_migrations_total{reason=\"operator\"} 0\n",
        "flowshard_migration_duration_seconds_count 16\n",
        "flowshard_migration_flows_handed_off_total{} 0\n",
        "flowshard_planner_policy{policy=\"reactive\"} 1.0\n",
    ] {
        assert!(text.contains(line), "no {line} in\n{text}");
    }
    agent.stop().unwrap();
}

/// An agent with a config of its own, offering its own synthetic traffic.
fn busy_config(policy: Policy) -> AgentConfig {
    let mut c = AgentConfig {
        token: Some(Secret::new(TOKEN)),
        tick_ms: 20,
        down_after_ms: 600_000,
        policy,
        ..AgentConfig::default()
    };
    c.telemetry.snapshot_ms = 20;
    c.emulated.flows = 2_000;
    c.emulated.new_flows_per_tick = 20;
    c.emulated.packets_per_tick = 2_000;
    c.forecast.refit_ticks = 10;
    c.forecast.history = 200;
    c.planner.min_active = 4;
    c.validate().unwrap();
    c
}

#[test]
fn predictive_forecasts_every_series_and_shows_model_point_and_interval() {
    let model = fresh_nic();
    let agent = start(busy_config(Policy::Predictive), model);
    // 7 classes, 4 nodes, 64 shards; packets/s, bytes/s, new flows/s each.
    let series = 3 * (7 + 4 + 64);
    let deadline = Instant::now() + Duration::from_secs(60);
    let fc = loop {
        let (code, fc) = agent.get("/forecast?steps=3");
        assert_eq!(code, 200, "{fc}");
        let s = fc["series"].as_array().unwrap();
        if s.len() == series && s.iter().all(|s| s["model"].is_string()) {
            break fc;
        }
        assert!(Instant::now() < deadline, "series without a model: {fc}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(fc["policy"], "predictive");
    assert_eq!(fc["steps"], 3);
    let models = ["seasonal_naive", "ets", "mstl", "arima", "combination"];
    let bytes0 = fc["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scope"] == "node" && s["id"] == "0" && s["metric"] == "bytes_per_s")
        .unwrap();
    assert!(
        models.contains(&bytes0["model"].as_str().unwrap()),
        "{bytes0}"
    );
    let (p, lo, hi) = (&bytes0["point"], &bytes0["lower"], &bytes0["upper"]);
    assert_eq!(p.as_array().unwrap().len(), 3, "{bytes0}");
    for i in 0..3 {
        let (p, lo, hi) = (
            p[i].as_f64().unwrap(),
            lo[i].as_f64().unwrap(),
            hi[i].as_f64().unwrap(),
        );
        assert!(lo <= p && p <= hi && p > 0.0, "step {i}: {lo} {p} {hi}");
    }
    let (_, classes) = agent.get("/forecast?scope=class");
    let classes = classes["series"].as_array().unwrap();
    assert_eq!(classes.len(), 21);
    assert!(
        classes
            .iter()
            .all(|s| s["point"].as_array().unwrap().len() == 10)
    );
    let (code, e) = agent.get("/forecast?steps=0");
    assert_eq!(code, 400);
    assert!(error(&e).contains("steps=0: must be 1..="), "{e}");
    let (code, e) = agent.get("/forecast?scope=planet");
    assert_eq!(code, 400, "{e}");
    let s = agent.wait_for(|s| s["loop"]["ticks"].as_u64() >= Some(100));
    assert_eq!(
        (s["policy"].as_str(), s["observe_only"].as_bool()),
        (Some("predictive"), Some(false))
    );
    assert!(s["forecast_refits_total"].as_u64() > Some(series as u64));
    eprintln!(
        "tick {:.3} ms, forecast stage {:.3} ms ({} refits), plan {:.3} ms",
        s["loop"]["total_s"].as_f64().unwrap() * 1e3,
        s["loop"]["forecast_s"].as_f64().unwrap() * 1e3,
        s["loop"]["refits"],
        s["loop"]["plan_s"].as_f64().unwrap() * 1e3,
    );
    let nodes = agent.get("/nodes").1;
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["power"] == "active")
    );
    agent.stop().unwrap();
}

/// Four packets of every flow of `flows`: with the four each sent before, its 8th
/// packet gives an early record, and the agent tracks it.
fn establish(wire: &mut Wire, flows: std::ops::Range<u32>) {
    for _ in 0..4 {
        wire.send(flows.clone(), false);
        wire.wait(1);
    }
}

#[test]
fn reactive_drains_an_idle_pool_hands_long_flows_off_and_records_each_move() {
    let model = fresh_nic();
    let mut wire = Wire {
        model: model.clone(),
        now_ns: 0,
    };
    // Flows established before the agent starts, their early records (at the 8th
    // packet) not sent yet: the agent tracks them from their records.
    for _ in 0..3 {
        wire.send(0..2_000, false);
        wire.wait(1);
    }
    let before = wire.nodes(0..2_000);
    let mut cfg = config(Some(TOKEN));
    cfg.policy = Policy::Reactive;
    cfg.migration.hand_off = true;
    cfg.migration.min_age_ms = 0;
    cfg.validate().unwrap();
    let agent = start(cfg, model.clone());
    // Idle nodes: HPA's count is one node, kept once the scale-down window is full.
    agent.wait_for(|s| s["nodes_active"] == 1);
    establish(&mut wire, 0..2_000);
    let (_, shard_node, states) = wire.tables();
    let kept: Vec<u16> = states
        .iter()
        .filter(|s| s.1 == NodeState::Active)
        .map(|s| s.0)
        .collect();
    assert_eq!(kept.len(), 1);
    assert!(shard_node.iter().all(|n| *n == kept[0]));
    let (_, moved) = agent.get("/migrations");
    let moved = moved.as_array().unwrap();
    assert_eq!(moved.len(), 48, "{moved:?}");
    assert!(
        moved
            .iter()
            .all(|m| m["reason"] == "scale" && m["to"] == kept[0])
    );
    // Every flow the agent tracked on a draining node was handed off to the kept one.
    let on_drained = before.iter().filter(|n| **n != kept[0]).count() as u64;
    let s = agent.wait_for(|s| s["flows_handed_off_total"].as_u64() == Some(on_drained));
    assert_eq!(s["migrations_total"]["scale"], 48);
    let (_, moved) = agent.get("/migrations");
    let moved = moved.as_array().unwrap();
    let handed: u64 = moved
        .iter()
        .map(|m| m["flows_handed_off"].as_u64().unwrap())
        .sum();
    assert_eq!(handed, on_drained);
    let bytes: u64 = moved
        .iter()
        .map(|m| m["state_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(bytes, handed * 512);
    // The NIC moves a handed-off flow at its next flowlet boundary: after a gap.
    wire.wait(1_000);
    assert!(wire.nodes(0..2_000).iter().all(|n| *n == kept[0]));
    let (_, text) = agent.text("/metrics");
    openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap();
    assert!(
        text.contains("flowshard_migrations_total{reason=\"scale\"} 48\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "flowshard_migration_flows_handed_off_total{{}} {on_drained}\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "flowshard_migration_state_bytes_total{{}} {}\n",
            on_drained * 512
        )),
        "{text}"
    );
    let (_, decisions) = agent.get("/decisions");
    assert!(decisions.as_array().unwrap().iter().any(|d| {
        d["applied"] == true
            && d["power"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p[1] == "draining")
    }));
    agent.stop().unwrap();
}

#[test]
fn observe_only_records_decisions_and_leaves_the_nic_tables_untouched() {
    let model = fresh_nic();
    let wire = Wire {
        model: model.clone(),
        now_ns: 0,
    };
    let tables = wire.tables();
    let mut cfg = config(Some(TOKEN));
    cfg.policy = Policy::Reactive;
    cfg.planner.observe_only = true;
    cfg.validate().unwrap();
    let agent = start(cfg, model.clone());
    let s = agent.wait_for(|s| s["loop"]["ticks"].as_u64() >= Some(20));
    assert_eq!(s["observe_only"], true);
    assert_eq!(s["nodes_active"], 4);
    let (_, decisions) = agent.get("/decisions");
    let d = decisions.as_array().unwrap();
    assert_eq!(d.len(), 1, "the same decision, repeated: {d:?}");
    assert_eq!(d[0]["applied"], false);
    assert!(d[0]["repeats"].as_u64() > Some(5), "{d:?}");
    let draining = d[0]["power"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p[1] == "draining")
        .count();
    assert_eq!(draining, 3, "{d:?}");
    assert_eq!(d[0]["moves"].as_array().unwrap().len(), 48);
    assert_eq!(wire.tables(), tables, "observe-only changed the NIC");
    assert_eq!(agent.get("/migrations").1, json!([]));
    assert!(
        agent
            .get("/nodes")
            .1
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["power"] == "active")
    );
    // Operators still act.
    let (code, m) = agent.post("/nodes/1/drain", Some(TOKEN), json!({}));
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["migrations"].as_array().unwrap().len(), 16);
    assert!(wire.tables().2.contains(&(1, NodeState::Draining)));
    agent.stop().unwrap();
}
