//! `flowshard top`: a running agent's nodes, shards, classes and migrations, refreshed
//! in place; `--once` prints one frame (the agent's status) and exits.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::Error;

fn get(base: &str, path: &str) -> Result<Value, Error> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut resp = ureq::get(&url)
        .call()
        .map_err(|e| Error::Agent(format!("GET {url}: {e}")))?;
    resp.body_mut()
        .read_json()
        .map_err(|e| Error::Agent(format!("GET {url}: not JSON: {e}")))
}

/// A JSON value as text without quotes, so it can be padded.
fn t(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

/// One frame of the view, as text.
pub fn frame(base: &str) -> Result<String, Error> {
    let status = get(base, "/status")?;
    let nodes = get(base, "/nodes")?;
    let shards = get(base, "/shards")?;
    let migrations = get(base, "/migrations")?;
    let mut o = String::new();
    let lp = &status["loop"];
    let _ = writeln!(
        o,
        "flowshard agent {base}: {} image v{}, NIC time {:.1} s, {} flows on the NIC, {} tracked; loop tick {:.3} ms (#{})",
        status["device"].as_str().unwrap_or("?"),
        t(&status["image_version"]),
        num(&status, "nic_time_ns") / 1e9,
        t(&status["nic_active_flows"]),
        t(&status["tracked_flows"]),
        num(lp, "total_s") * 1e3,
        t(&lp["ticks"]),
    );
    let _ = writeln!(
        o,
        "planner: {}{}, forecast stage {:.3} ms, {} decisions",
        status["policy"].as_str().unwrap_or("?"),
        if status["observe_only"] == true {
            " (observe-only)"
        } else {
            ""
        },
        num(lp, "forecast_s") * 1e3,
        t(&status["decisions_total"]),
    );
    let r = &status["rings"];
    let _ = writeln!(
        o,
        "rings: telemetry {}/{} (overflow {}), commands epoch {} (errors {})\n",
        t(&r["telemetry_occupancy"]),
        t(&r["telemetry_entries"]),
        t(&r["telemetry_overflow"]),
        t(&r["command_epoch"]),
        r["command_errors"]
    );
    let _ = writeln!(
        o,
        "{:>4}  {:<8} {:<8} {:>6} {:>6} {:>9} {:>9} {:>9} {:>12} {:>14}",
        "NODE",
        "STATE",
        "POWER",
        "WEIGHT",
        "SHARDS",
        "LOAD",
        "FORECAST",
        "CAPACITY",
        "ACTIVE",
        "PACKETS"
    );
    for n in nodes.as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "{:>4}  {:<8} {:<8} {:>6} {:>6} {:>8.3}G {:>8.3}G {:>8.1}G {:>12} {:>14}",
            t(&n["id"]),
            n["state"].as_str().unwrap_or("?"),
            // `warming` comes as an object with its ready tick.
            n["power"]
                .as_str()
                .or_else(|| n["power"].as_object()?.keys().next().map(String::as_str))
                .unwrap_or("?"),
            t(&n["weight"]),
            t(&n["shards"]),
            num(n, "load_gbps"),
            num(n, "forecast_gbps"),
            num(n, "capacity_gbps"),
            t(&n["active_flows"]),
            t(&n["packets"]),
        );
    }
    let mut busiest: Vec<&Value> = shards.as_array().into_iter().flatten().collect();
    busiest.sort_by(|a, b| num(b, "packets").total_cmp(&num(a, "packets")));
    let _ = writeln!(
        o,
        "\n{:>5} {:>5} {:>8} {:>14} {:>10}",
        "SHARD", "NODE", "BUCKETS", "PACKETS", "FLOWS"
    );
    for s in busiest.iter().take(8) {
        let _ = writeln!(
            o,
            "{:>5} {:>5} {:>8} {:>14} {:>10}",
            t(&s["id"]),
            t(&s["node"]),
            t(&s["buckets"]),
            t(&s["packets"]),
            t(&s["flows"])
        );
    }
    let _ = writeln!(o, "\nmigrations: {}", status["migrations_total"]);
    for m in migrations.as_array().into_iter().flatten().rev().take(5) {
        let _ = writeln!(
            o,
            "  #{} shard {} node {} -> {} ({})",
            t(&m["id"]),
            t(&m["shard"]),
            t(&m["from"]),
            t(&m["to"]),
            m["reason"].as_str().unwrap_or("?")
        );
    }
    Ok(o)
}

/// Print frames every `interval` until interrupted, or one with `once`.
pub fn run(base: &str, once: bool, interval: Duration) -> Result<(), Error> {
    loop {
        let f = frame(base)?;
        if once {
            print!("{f}");
            return Ok(());
        }
        print!("\x1b[2J\x1b[H{f}");
        std::thread::sleep(interval);
    }
}
