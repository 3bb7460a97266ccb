//! The `flowshard` binary against `flowshard nic-sim` over a real vfio-user socket:
//! start the emulator, build and flash an image, read status; bad images; a flash
//! process killed midway; a user's own signing key.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding};

const BIN: &str = env!("CARGO_BIN_EXE_flowshard");

/// A running `flowshard nic-sim`, killed when dropped.
struct Sim {
    child: Child,
    socket: PathBuf,
}

impl Sim {
    fn start(dir: &Path, args: &[&str]) -> Sim {
        Sim::spawn(dir.join("nic.sock"), args, Stdio::null())
    }

    /// `flowshard nic-sim --socket SOCKET ARGS`, once the socket is there (or 5 s on).
    fn spawn(socket: PathBuf, args: &[&str], stderr: Stdio) -> Sim {
        let child = Command::new(BIN)
            .arg("nic-sim")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stderr(stderr)
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Sim { child, socket }
    }

    fn device(&self) -> String {
        format!("vfio-user:{}", self.socket.display())
    }

    fn status(&self) -> serde_json::Value {
        let out = run(&["status", "--device", &self.device(), "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "flowshard {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "flowshard {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn default_image_flashes_onto_default_nic_sim_and_bad_images_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(dir.path(), &[]);
    let img = dir.path().join("nic.img");
    let img_s = img.to_str().unwrap();
    ok(&["image", "build", "-o", img_s]);
    assert!(ok(&["image", "inspect", img_s]).contains("(the development key)"));
    let dev = sim.device();
    assert!(
        ok(&["flash", "--device", &dev, img_s]).contains("into slot B; running image version 1")
    );
    let s = sim.status();
    assert_eq!(s["running"], true);
    assert_eq!(s["image_version"], 1);
    assert_eq!(s["slot"], "B");
    assert_eq!(s["buckets"], 65_536);
    let text = ok(&["status", "--device", &dev]);
    assert!(text.contains("version 1 in slot B"), "{text}");

    let good = std::fs::read(&img).unwrap();
    let bad = dir.path().join("bad.img");
    let bad_s = bad.to_str().unwrap();
    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() - 30].to_vec(), "truncated image"),
        ([b"GARBAGE!".as_slice(), &good[8..]].concat(), "wrong magic"),
        (
            [&good[..8], &[2u8], &good[9..]].concat(),
            "unsupported image format version 2",
        ),
    ];
    let mut b = good.clone();
    b[70] ^= 1;
    cases.push((b, "bad CRC32C of the image payload"));
    ok(&["image", "build", "--unsigned", "-o", bad_s]);
    cases.push((
        std::fs::read(&bad).unwrap(),
        "not signed and the NIC requires a signature",
    ));
    let mut b = good.clone();
    let n = b.len();
    b[n - 1] ^= 1;
    cases.push((b, "bad image signature"));
    std::fs::write(dir.path().join("big.toml"), "buckets = 1048575\n").unwrap();
    let e = fails(&[
        "image",
        "build",
        "--config",
        dir.path().join("big.toml").to_str().unwrap(),
        "-o",
        bad_s,
    ]);
    assert!(e.contains("`buckets`: must be a power of two"), "{e}");
    for (bytes, want) in cases {
        std::fs::write(&bad, &bytes).unwrap();
        let e = fails(&["flash", "--device", &dev, bad_s]);
        assert!(
            e.contains(want) && e.contains("active image untouched"),
            "{want}: {e}"
        );
        let after = sim.status();
        assert_eq!(
            (
                &after["image_version"],
                &after["slot"],
                &after["pending"],
                &after["resets"]
            ),
            (&s["image_version"], &s["slot"], &s["pending"], &s["resets"]),
            "{want}"
        );
    }
}

#[test]
fn a_flash_killed_midway_leaves_a_bootable_device() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(dir.path(), &[]);
    let dev = sim.device();
    let v1 = dir.path().join("v1.img");
    ok(&["image", "build", "-o", v1.to_str().unwrap()]);
    ok(&["flash", "--device", &dev, v1.to_str().unwrap()]);
    // A large image (many classifier rules) in 4-byte chunks: 8,000 progress lines,
    // more than a pipe holds, so the flash cannot run ahead to the end while this test
    // reads up to the middle.
    let rules: String = (0..4000)
        .map(|p| format!("[[port_rules]]\nproto = 6\nports = [{p}, {p}]\nclass = \"web\"\n"))
        .collect();
    let toml = dir.path().join("big.toml");
    std::fs::write(&toml, rules).unwrap();
    let v2 = dir.path().join("v2.img");
    ok(&[
        "image",
        "build",
        "--config",
        toml.to_str().unwrap(),
        "--image-version",
        "2",
        "-o",
        v2.to_str().unwrap(),
    ]);
    let mut flash = Command::new(BIN)
        .args([
            "flash",
            "--device",
            &dev,
            "--json",
            "--chunk-size",
            "4",
            v2.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(flash.stdout.take().unwrap()).lines();
    loop {
        let line: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if line["written"].as_u64().unwrap() * 2 > line["total"].as_u64().unwrap() {
            break;
        }
    }
    flash.kill().unwrap();
    flash.wait().unwrap();
    let s = sim.status();
    assert_eq!(
        (&s["running"], &s["image_version"], &s["slot"]),
        (&true.into(), &1.into(), &"B".into())
    );
    assert_eq!(s["pending"], serde_json::Value::Null);
    assert_eq!(
        s["slot_a"]["valid"], false,
        "the half-written slot is not valid"
    );
    // The device still flashes and boots normally.
    ok(&["flash", "--device", &dev, v2.to_str().unwrap()]);
    assert_eq!(sim.status()["image_version"], 2);
}

#[test]
fn a_nic_sim_with_its_own_key_takes_only_images_signed_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[42; 32]);
    let (sk, pk) = (dir.path().join("key.pem"), dir.path().join("key.pub"));
    std::fs::write(&sk, key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
    std::fs::write(
        &pk,
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
    .unwrap();
    let sim = Sim::start(dir.path(), &["--trusted-key", pk.to_str().unwrap()]);
    let dev = sim.device();
    let img = dir.path().join("nic.img");
    let img_s = img.to_str().unwrap();
    ok(&["image", "build", "-o", img_s]);
    let e = fails(&["flash", "--device", &dev, img_s]);
    assert!(e.contains("which the NIC does not trust"), "{e}");
    ok(&["image", "sign", "--key", sk.to_str().unwrap(), img_s]);
    assert!(
        ok(&[
            "image",
            "inspect",
            img_s,
            "--trusted-key",
            pk.to_str().unwrap()
        ])
        .contains("valid for the trusted key")
    );
    ok(&["flash", "--device", &dev, img_s]);
    assert_eq!(sim.status()["image_version"], 1);
    let e = fails(&["status", "--device", "vfio-user:/nonexistent/nic.sock"]);
    assert!(
        e.contains("is `flowshard nic-sim --socket /nonexistent/nic.sock` running?"),
        "{e}"
    );
}

/// A capture of `flows` flows, `per_flow` packets each, `gap_ns` apart.
fn write_capture(path: &Path, flows: u32, per_flow: u32, gap_ns: u64) -> u64 {
    use hw_sim::capture::PcapWriter;
    use hw_sim::generate::{FRAME_LEN, WIRE_LEN, write_frame};
    let f = std::fs::File::create(path).unwrap();
    let mut w =
        PcapWriter::new(std::io::BufWriter::new(f), nic_firmware::LinkType::Ethernet).unwrap();
    let mut buf = [0u8; FRAME_LEN];
    let mut n = 0;
    for i in 0..per_flow {
        for flow in 0..flows {
            write_frame(flow, &mut buf);
            w.write(
                1_700_000_000_000_000_000 + u64::from(i * flows + flow) * gap_ns,
                &buf,
                WIRE_LEN,
            )
            .unwrap();
            n += 1;
        }
    }
    w.flush().unwrap();
    n
}

fn count_packets(path: &Path) -> (u64, Vec<u64>) {
    let mut r = hw_sim::capture::CaptureReader::open(path).unwrap();
    let mut ts = Vec::new();
    while let Some(p) = r.next_packet().unwrap() {
        ts.push(p.ts_ns);
    }
    (ts.len() as u64, ts)
}

#[test]
fn replayed_captures_decide_as_flowshard_replay_and_split_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("in.pcap");
    let total = write_capture(&cap, 200, 5, 1_000);
    let (cap_s, d) = (cap.to_str().unwrap(), dir.path());
    let replay_csv = d.join("replay.csv");
    ok(&[
        "replay",
        "--pcap",
        cap_s,
        "--decisions",
        replay_csv.to_str().unwrap(),
    ]);
    let sim_csv = d.join("sim.csv");
    let nodes = d.join("nodes");
    let out = ok(&[
        "nic-sim",
        "--pcap",
        cap_s,
        "--fast",
        "--json",
        "--decisions",
        sim_csv.to_str().unwrap(),
        "--node-pcap",
        nodes.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(&replay_csv).unwrap(),
        std::fs::read(&sim_csv).unwrap(),
        "same decision log as flowshard replay"
    );
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["packets"], total);
    let per_node = s["nodes"].as_array().unwrap();
    let mut in_files = 0;
    for n in per_node {
        let file = nodes.join(format!("node-{}.pcap", n["node"]));
        let (count, _) = if n["packets"] == 0 {
            (0, Vec::new())
        } else {
            count_packets(&file)
        };
        assert_eq!(n["packets"], count, "node {}", n["node"]);
        in_files += count;
    }
    assert_eq!(in_files, total);
    // Looped: three rounds, NIC time never goes back.
    let looped = d.join("looped.csv");
    let out = ok(&[
        "nic-sim",
        "--pcap",
        cap_s,
        "--fast",
        "--loop",
        "3",
        "--json",
        "--decisions",
        looped.to_str().unwrap(),
    ]);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s["packets"].as_u64(), s["rounds"].as_u64()),
        (Some(3 * total), Some(3))
    );
    let ts: Vec<u64> = std::fs::read_to_string(&looped)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(ts.len() as u64, 3 * total);
    assert!(
        ts.windows(2).all(|w| w[0] <= w[1]),
        "NIC time is monotonic across rounds"
    );
    assert!(ts[ts.len() - 1] > ts[0] + 2 * (ts[total as usize - 1] - ts[0]));
}

#[test]
fn captured_pace_is_kept_and_scaled() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("slow.pcap");
    // 300 packets over 1.5 s: long enough that process start-up on a loaded machine
    // stays well below the paced replay's duration.
    write_capture(&cap, 10, 30, 5_000_000);
    let cap_s = cap.to_str().unwrap();
    let timed = |args: &[&str]| {
        let t = std::time::Instant::now();
        ok(args);
        t.elapsed()
    };
    let paced = timed(&["nic-sim", "--pcap", cap_s, "--speed", "2"]);
    assert!(paced >= std::time::Duration::from_millis(725), "{paced:?}");
    let fast = timed(&["nic-sim", "--pcap", cap_s, "--fast"]);
    assert!(fast < paced, "{fast:?} vs {paced:?}");
    let e = fails(&["nic-sim", "--pcap", cap_s, "--speed", "0"]);
    assert!(e.contains("--speed must be above 0"), "{e}");
}

#[test]
fn synthetic_traffic_reaches_every_node() {
    let out = ok(&[
        "nic-sim",
        "--generate-flows",
        "1000",
        "--generate-packets",
        "20000",
        "--zipf",
        "1.1",
        "--json",
    ]);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["packets"], 20_000);
    let nodes = s["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4);
    assert_eq!(
        nodes
            .iter()
            .map(|n| n["packets"].as_u64().unwrap())
            .sum::<u64>(),
        20_000
    );
    assert!(nodes.iter().all(|n| n["flows"].as_u64().unwrap() > 0));
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn traffic_waits_for_a_flashed_image_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("in.pcap");
    let total = write_capture(&cap, 50, 4, 1_000);
    let socket = dir.path().join("nic.sock");
    let sim = Command::new(BIN)
        .args([
            "nic-sim",
            "--json",
            "--fast",
            "--socket",
            socket.to_str().unwrap(),
            "--pcap",
            cap.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while !socket.exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let img = dir.path().join("nic.img");
    ok(&["image", "build", "-o", img.to_str().unwrap()]);
    let dev = format!("vfio-user:{}", socket.display());
    ok(&["flash", "--device", &dev, img.to_str().unwrap()]);
    let mut status: serde_json::Value = serde_json::Value::Null;
    for _ in 0..200 {
        status = serde_json::from_str(&ok(&["status", "--device", &dev, "--json"])).unwrap();
        if status["flows_active"] == 50 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        status["flows_active"], 50,
        "the whole capture went through the flashed image"
    );
    sigterm(&sim);
    let out = sim.wait_with_output().unwrap();
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["packets"], total);
    assert!(!socket.exists(), "the socket is removed on SIGTERM");
}

#[test]
fn live_capture_on_loopback_sees_sent_packets() {
    let mut sim = Command::new(BIN)
        .args(["nic-sim", "--live", "lo", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the capture is open (or has failed).
    let mut stderr = BufReader::new(sim.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    if !first.contains("capturing live on lo") {
        // Capturing needs CAP_NET_RAW; without it the error must say so, by interface.
        assert!(first.contains("live capture on lo"), "{first}");
        eprintln!("SKIP: no capture permission here: {first}");
        sim.wait().unwrap();
        return;
    }
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..20 {
        sock.send_to(b"flowshard", "127.0.0.1:9").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    sigterm(&sim);
    let out = sim.wait_with_output().unwrap();
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let udp = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["packets"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(udp >= 20, "{s}");
}

/// `flowshard nic-sim --flash-dir FLASH` on a socket of its own (a restarted emulator
/// must not be mistaken for the one killed), its log in `log`.
fn start_with_flash(dir: &Path, run: u32, flash: &Path, log: &Path) -> Sim {
    Sim::spawn(
        dir.join(format!("nic-{run}.sock")),
        &["--flash-dir", flash.to_str().unwrap()],
        std::fs::File::create(log).unwrap().into(),
    )
}

fn kill(mut sim: Sim) {
    sim.child.kill().unwrap();
    sim.child.wait().unwrap();
}

#[test]
fn flashed_slots_survive_restarts_and_kills_at_any_point_and_a_damaged_slot_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let flash_dir = dir.path().join("flash");
    let log = dir.path().join("sim.log");
    let (v1, v2) = (dir.path().join("v1.img"), dir.path().join("v2.img"));
    ok(&["image", "build", "-o", v1.to_str().unwrap()]);
    // The second image carries the classifier tables: 430 KiB, several chunks.
    ok(&[
        "image",
        "build",
        "--classifier",
        "--image-version",
        "2",
        "-o",
        v2.to_str().unwrap(),
    ]);
    let mut run = 0;
    let restart = |run: &mut u32| {
        *run += 1;
        start_with_flash(dir.path(), *run, &flash_dir, &log)
    };
    let sim = restart(&mut run);
    assert_eq!(sim.status()["running"], false);
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("no bootable image yet")
    );
    ok(&["flash", "--device", &sim.device(), v1.to_str().unwrap()]);
    kill(sim);
    let sim = restart(&mut run);
    let s = sim.status();
    assert_eq!(
        (&s["running"], &s["image_version"], &s["slot"]),
        (&true.into(), &1.into(), &"B".into()),
        "the flashed image boots after a restart"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("booted slot B (image version 1)")
    );
    // Kill the emulator at points spread over a flash of v2: every restart boots v1 or
    // v2, never nothing.
    let mut versions = std::collections::BTreeSet::new();
    let mut sim = sim;
    for delay_ms in [0u64, 3, 8, 15, 25, 40, 60, 90] {
        let mut flash = Command::new(BIN)
            .args(["flash", "--device", &sim.device(), "--chunk-size", "65536"])
            .arg(&v2)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        kill(sim);
        flash.wait().unwrap();
        sim = restart(&mut run);
        let s = sim.status();
        assert_eq!(
            s["running"], true,
            "killed after {delay_ms} ms: nothing boots"
        );
        let v = s["image_version"].as_u64().unwrap();
        assert!(v == 1 || v == 2, "{v}");
        versions.insert(v);
        // Back to v1 running, so the next kill lands in a flash again.
        if v == 2 {
            ok(&["flash", "--device", &sim.device(), v1.to_str().unwrap()]);
        }
    }
    eprintln!("versions booted after kills: {versions:?}");
    // Both slots hold an image now: v2 flashed over whichever does not run.
    ok(&["flash", "--device", &sim.device(), v2.to_str().unwrap()]);
    let s = sim.status();
    assert_eq!(s["image_version"], 2);
    let running = s["slot"].as_str().unwrap().to_lowercase();
    let other = if running == "a" { "b" } else { "a" };
    assert_eq!(s[format!("slot_{other}")]["valid"], true);
    kill(sim);
    // The running slot's file damaged on disk: named, and the other slot boots.
    let file = flash_dir.join(format!("slot-{running}.img"));
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    std::fs::write(&file, bytes).unwrap();
    let sim = restart(&mut run);
    let s = sim.status();
    assert_eq!(s["running"], true);
    assert_eq!(s["slot"].as_str().unwrap().to_lowercase(), other);
    assert_eq!(s["fell_back"], true);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!(
            "flash slot {} ({}) is not a bootable image: bad CRC32C",
            running.to_uppercase(),
            file.display()
        )) && text.contains(&format!(
            "falling back from slot {}",
            running.to_uppercase()
        )),
        "{text}"
    );
    // It flashes again over the damaged slot.
    ok(&["flash", "--device", &sim.device(), v2.to_str().unwrap()]);
    assert_eq!(sim.status()["image_version"], 2);
}
