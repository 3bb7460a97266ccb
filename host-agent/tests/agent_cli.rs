//! `flowshard agent` as operators run it: bad configurations exit 64 naming the key;
//! a running agent answers `flowshard top --once` and stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flowshard");

fn agent_with(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&path)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_exit_64_and_say_which_key_and_why() {
    let cases = [
        (
            "tick_ms = 100\nlisen = \"1.2.3.4:5\"",
            "unknown field `lisen`",
        ),
        (
            "[telemetry]\nring_log2 = \"big\"",
            "invalid type: string \"big\"",
        ),
        ("tick_ms = 5", "`tick_ms`: 5 is outside 10..=60000"),
        ("policy = \"psychic\"", "unknown variant `psychic`"),
        ("[planner]\nmax_moves = 3", "unknown field `max_moves`"),
        (
            "[planner]\ntolerance = 1.5",
            "`planner.tolerance`: must lie in [0, 1), got 1.5",
        ),
        (
            "[[nodes]]\nid = 0\ncapacity_gbps = 0.0",
            "`nodes[0].capacity_gbps`",
        ),
        ("token = \"abc\"", "`token`: shorter than 16 characters"),
        ("device = \"pci:3:0.0\"", "pci:3:0.0: not a PCI address"),
        (
            "device = \"vfio-user:/run/nic.sock\"\n[emulated]\nflows = 5",
            "[emulated] configures the in-process NIC only",
        ),
        (
            "[emulated]\nnic_config = \"/nonexistent/nic.toml\"",
            "/nonexistent/nic.toml",
        ),
    ];
    for (text, want) in cases {
        let (code, err) = agent_with(text);
        assert_eq!(code, Some(64), "{text}: {err}");
        assert!(err.contains(want), "{text}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = Command::new(BIN)
        .args(["agent", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
}

#[test]
fn a_separate_nic_that_is_not_there_is_named_with_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nic.sock");
    let (code, err) = agent_with(&format!("device = \"vfio-user:{}\"", socket.display()));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("vfio-user:{}", socket.display()))
            && err.contains("is `flowshard nic-sim --socket"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The kernel VFIO path, up to the kernel: a PCI function this machine lacks.
    let (code, err) = agent_with("device = \"pci:0000:FE:1F.7\"");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("pci:0000:fe:1f.7: no such PCI device"),
        "{err}"
    );
}

#[test]
fn an_agent_finding_the_nic_busy_with_another_client_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nic.sock");
    let mut sim = Command::new(BIN)
        .arg("nic-sim")
        .arg("--socket")
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let held = flowshard::device::VfioUser::connect(&socket);
    let (code, err) = agent_with(&format!("device = \"vfio-user:{}\"", socket.display()));
    drop(held);
    let _ = sim.kill();
    let _ = sim.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no answer within 3 s") && err.contains("one client at a time"),
        "{err}"
    );
}

#[test]
fn a_running_agent_answers_top_and_stops_on_sigterm() {
    let mut child = Command::new(BIN)
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--log-json",
            "--policy",
            "predictive",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("agent exited before serving").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("log lines are JSON");
        if let Some(a) = v["fields"]["addr"].as_str() {
            break a.to_string();
        }
    };
    // The default config drives the in-process NIC with synthetic traffic.
    let url = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let frame = loop {
        let out = Command::new(BIN)
            .args(["top", "--once", "--agent", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        if !text.contains(" 0 tracked") {
            break text;
        }
        assert!(Instant::now() < deadline, "no flow tracked: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(frame.contains("in-process image v1"), "{frame}");
    assert!(frame.contains("NODE  STATE    POWER"), "{frame}");
    assert!(frame.contains("planner: predictive,"), "{frame}");
    // SAFETY: kill(2) on the child this test spawned and has not yet reaped.
    let r = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(r, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("SIGTERM")), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("keeps steering")),
        "{rest:?}"
    );
}
