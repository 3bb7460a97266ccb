//! Load of real nodes from their Prometheus endpoints: node_exporter's CPU, memory and
//! network metrics, scraped every `node_scrape_ms`.
//!
//! A scraper task per node hands each result to the control loop as a [`Report`]; the
//! loop turns consecutive samples into rates and marks a node down when its endpoint
//! has not answered for `down_after_ms`.

use std::sync::mpsc::Sender;
use std::time::Duration;

use crate::agent::{Answer, Request};

/// Cumulative counters of one scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NodeSample {
    /// CPU seconds spent in any mode but idle and iowait, all CPUs.
    pub cpu_busy_s: f64,
    pub cpu_total_s: f64,
    pub mem_total_bytes: f64,
    pub mem_available_bytes: f64,
    /// Bytes received and sent on every interface but loopback.
    pub net_bytes: f64,
    /// Packets received, and received packets dropped, on every interface but
    /// loopback (`node_network_receive_{packets,drop}_total`): the node's drop rate.
    pub rx_packets: f64,
    pub rx_drops: f64,
}

/// What one scrape gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    Sample(NodeSample),
    Failed(String),
}

/// Read node_exporter metrics from exposition text.
pub fn parse(text: &str) -> Result<NodeSample, String> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape =
        prometheus_parse::Scrape::parse(lines).map_err(|e| format!("unreadable metrics: {e}"))?;
    let mut s = NodeSample::default();
    let (mut cpu, mut mem) = (false, false);
    for m in &scrape.samples {
        let v = match m.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        if !v.is_finite() {
            continue;
        }
        match m.metric.as_str() {
            "node_cpu_seconds_total" => {
                cpu = true;
                s.cpu_total_s += v;
                if !matches!(m.labels.get("mode"), Some("idle" | "iowait")) {
                    s.cpu_busy_s += v;
                }
            }
            "node_memory_MemTotal_bytes" => {
                mem = true;
                s.mem_total_bytes = v;
            }
            "node_memory_MemAvailable_bytes" => s.mem_available_bytes = v,
            "node_network_receive_bytes_total" | "node_network_transmit_bytes_total"
                if m.labels.get("device") != Some("lo") =>
            {
                s.net_bytes += v
            }
            "node_network_receive_packets_total" if m.labels.get("device") != Some("lo") => {
                s.rx_packets += v
            }
            "node_network_receive_drop_total" if m.labels.get("device") != Some("lo") => {
                s.rx_drops += v
            }
            _ => {}
        }
    }
    if !cpu || !mem {
        return Err(
            "no node_cpu_seconds_total or node_memory_MemTotal_bytes: not node_exporter metrics"
                .into(),
        );
    }
    Ok(s)
}

fn scrape(http: &ureq::Agent, url: &str) -> Report {
    let text = http
        .get(url)
        .call()
        .map_err(|e| e.to_string())
        .and_then(|mut r| r.body_mut().read_to_string().map_err(|e| e.to_string()));
    match text.and_then(|t| parse(&t)) {
        Ok(s) => Report::Sample(s),
        Err(e) => Report::Failed(format!("{url}: {e}")),
    }
}

/// Scrape `url` every `every` until `stop` turns true, reporting to the loop.
pub async fn scrape_loop(
    node: u16,
    url: String,
    every: Duration,
    loop_tx: Sender<(Request, Option<Answer>)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(every))
        .build()
        .into();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (h, u) = (http.clone(), url.clone());
        let report = match tokio::task::spawn_blocking(move || scrape(&h, &u)).await {
            Ok(r) => r,
            Err(e) => Report::Failed(format!("{url}: scrape task failed: {e}")),
        };
        if loop_tx
            .send((Request::NodeReport(node, report), None))
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE_EXPORTER: &str = "\
# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.
# TYPE node_cpu_seconds_total counter
node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 100
node_cpu_seconds_total{cpu=\"0\",mode=\"user\"} 30
node_cpu_seconds_total{cpu=\"0\",mode=\"iowait\"} 5
node_cpu_seconds_total{cpu=\"1\",mode=\"idle\"} 90
node_cpu_seconds_total{cpu=\"1\",mode=\"system\"} 25
# TYPE node_memory_MemTotal_bytes gauge
node_memory_MemTotal_bytes 8e+09
# TYPE node_memory_MemAvailable_bytes gauge
node_memory_MemAvailable_bytes 6e+09
# TYPE node_network_receive_bytes_total counter
node_network_receive_bytes_total{device=\"eth0\"} 1000
node_network_receive_bytes_total{device=\"lo\"} 999999
# TYPE node_network_transmit_bytes_total counter
node_network_transmit_bytes_total{device=\"eth0\"} 500
";

    #[test]
    fn node_exporter_metrics_give_cpu_memory_and_network() {
        let s = parse(NODE_EXPORTER).unwrap();
        assert_eq!(s.cpu_total_s, 250.0);
        assert_eq!(s.cpu_busy_s, 55.0);
        assert_eq!((s.mem_total_bytes, s.mem_available_bytes), (8e9, 6e9));
        assert_eq!(s.net_bytes, 1500.0);
    }

    #[test]
    fn other_text_is_refused_with_a_reason() {
        let e = parse("up 1\n").unwrap_err();
        assert!(e.contains("not node_exporter metrics"), "{e}");
        assert!(parse("\u{0}garbage {{{").is_err());
    }
}
