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
        let socket = dir.join("nic.sock");
        let child = Command::new(BIN)
            .arg("nic-sim")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stderr(Stdio::null())
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
