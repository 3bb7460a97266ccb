//! `flowshard classify` when the profiler cannot run: the flows are still steered and
//! listed, and the command names what is missing and how to get it. Each case is its
//! own process, as ONNX Runtime is loaded once per process.

use std::path::PathBuf;
use std::process::{Command, Output};

fn data_dir() -> PathBuf {
    flowshard::profiler::data_dir()
}

fn netflix() -> Option<PathBuf> {
    let p = data_dir().join("ndpi/pcap/netflix.pcap");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIP: no capture {} (run scripts/setup.sh)", p.display());
        None
    }
}

fn classify(args: &[&str], ort: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flowshard"));
    c.arg("classify").args(args);
    match ort {
        Some(lib) => c.env("ORT_DYLIB_PATH", lib),
        None => c.env_remove("ORT_DYLIB_PATH"),
    };
    c.output().expect("flowshard runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_missing_onnx_runtime_is_named_and_flows_are_still_listed() {
    let Some(pcap) = netflix() else { return };
    let out = classify(
        &["--pcap", pcap.to_str().unwrap(), "--json"],
        Some("/nonexistent/libonnxruntime.so"),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/libonnxruntime.so not found"),
        "{stderr}"
    );
    assert!(stderr.contains("scripts/setup.sh"), "{stderr}");
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON row"))
        .collect();
    assert_eq!(rows.len(), 61, "every flow of the capture is listed");
    assert!(
        rows.iter()
            .all(|r| r["class"] == "unclassified" && r["confidence"].is_null())
    );
}

#[test]
fn a_file_that_is_not_onnx_runtime_is_refused() {
    let Some(pcap) = netflix() else { return };
    let p = pcap.to_str().unwrap();
    let out = classify(&["--pcap", p], Some(p));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("cannot be used"), "{stderr}");
}

#[test]
fn a_missing_model_file_is_named() {
    let Some(pcap) = netflix() else { return };
    let out = classify(
        &[
            "--pcap",
            pcap.to_str().unwrap(),
            "--model",
            "/nonexistent/profiler.onnx",
        ],
        None,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("profiler model /nonexistent/profiler.onnx not found"),
        "{stderr}"
    );
    assert!(stderr.contains("make model"), "{stderr}");
}

#[test]
fn a_corrupt_model_file_is_named() {
    let Some(pcap) = netflix() else { return };
    let lib = flowshard::profiler::library_path();
    if !lib.exists() {
        eprintln!(
            "SKIP: no ONNX Runtime at {} (run scripts/setup.sh)",
            lib.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("broken.onnx");
    std::fs::write(&model, b"not an ONNX model").expect("write");
    std::fs::write(tmp.path().join("broken.trees.json"), b"{\"packets\": 8}").expect("write");
    let out = classify(
        &[
            "--pcap",
            pcap.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ],
        None,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!("profiler model {}", model.display())),
        "{stderr}"
    );
    assert!(stderr.contains("NIC tables not loaded"), "{stderr}");
}

#[test]
fn classify_prints_one_row_per_flow_with_its_class() {
    let Some(pcap) = netflix() else { return };
    if !flowshard::profiler::library_path().exists() {
        eprintln!("SKIP: no ONNX Runtime (run scripts/setup.sh)");
        return;
    }
    let out = classify(&["--pcap", pcap.to_str().unwrap()], None);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["proto", "src", "dst", "packets", "class", "confidence"]
    );
    assert_eq!(lines.len(), 62);
    let row: Vec<&str> = lines
        .iter()
        .find(|l| l.contains("192.168.1.7:53217"))
        .expect("nDPI's largest Netflix flow")
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..4],
        ["tcp", "192.168.1.7:53217", "23.246.11.141:80", "1880"]
    );
    assert_eq!(row[4], "video");
    assert!(stderr.contains("agree with the model"), "{stderr}");
}
