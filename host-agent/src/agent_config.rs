//! The agent's configuration: TOML, unknown keys refused, every value checked before the
//! agent touches the device. `flowshard.agent.example.toml` shows every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::nic_config::ConfigFileError;
use crate::planner::{PlannerConfig, Policy};

/// How the agent reaches its NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The emulated NIC linked into the agent, running the embedded default image (or
    /// `emulated.nic_config`), fed by the agent's synthetic traffic source.
    InProcess,
    /// The emulated NIC served by another process on this UNIX socket
    /// (`flowshard nic-sim --socket PATH`), fed by that process's traffic source.
    VfioUser(PathBuf),
    /// A PCI function through kernel VFIO, by its address `DDDD:BB:DD.F` (lower case,
    /// as sysfs names it), fed by its links.
    Pci(String),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::InProcess => f.write_str("in-process"),
            DeviceSpec::VfioUser(p) => write!(f, "vfio-user:{}", p.display()),
            DeviceSpec::Pci(b) => write!(f, "pci:{b}"),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "in-process" {
            Ok(DeviceSpec::InProcess)
        } else if let Some(p) = s.strip_prefix("vfio-user:").filter(|p| !p.is_empty()) {
            Ok(DeviceSpec::VfioUser(p.into()))
        } else if let Some(b) = s.strip_prefix("pci:") {
            // Checked here so a mistyped address is a config error (exit 64), not a
            // failure to open a device that cannot exist.
            crate::device::parse_pci_address(b)
                .map(DeviceSpec::Pci)
                .map_err(serde::de::Error::custom)
        } else {
            Err(serde::de::Error::custom(format!(
                "device `{s}`: expected \"in-process\", \"vfio-user:PATH\" or \"pci:BDF\""
            )))
        }
    }
}

/// A secret that never shows in logs or `Debug` output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// Compare in time independent of where the first difference is.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Everything `flowshard agent` runs with.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub device: DeviceSpec,
    /// Address of the HTTP API and `/metrics`.
    pub listen: SocketAddr,
    /// Bearer token for mutating API calls; without one they are refused.
    pub token: Option<Secret>,
    pub log_format: LogFormat,
    /// Period of the control loop.
    pub tick_ms: u64,
    /// Longest a shutdown waits for the loop and the API to finish.
    pub shutdown_timeout_ms: u64,
    /// An active node with shards that receives no packet for this long (NIC time)
    /// while the NIC forwards traffic is marked down.
    pub down_after_ms: u64,
    /// Flows the agent tracks from feature records; beyond it new flows are counted
    /// but not tracked.
    pub max_tracked_flows: usize,
    /// Period of scraping nodes' `metrics_url`, and the longest a scrape may take.
    pub node_scrape_ms: u64,
    pub command_ring_log2: u32,
    /// How the plan stage decides: `static` (every node on, nothing moves but what
    /// operators move), `reactive` (measured-load thresholds) or `predictive`
    /// (forecasts, with the reactive rules as a safety net). `--policy` overrides it.
    pub policy: Policy,
    /// The planner's knobs (`planner::PlannerConfig`), unknown keys refused.
    pub planner: PlannerConfig,
    /// Time a node the planner starts needs before it can take flows. Starting and
    /// stopping nodes is outside the agent: it logs the decision, records it in the
    /// node's `power`, and steers no flow to the node until it is warm.
    pub node_warmup_ms: u64,
    pub forecast: ForecastSettings,
    pub migration: MigrationSettings,
    pub telemetry: TelemetrySettings,
    pub emulated: EmulatedSettings,
    /// Per-node settings; nodes the image defines but this list omits get the defaults.
    pub nodes: Vec<NodeSettings>,
}

/// The forecast stage: a series per class, node and shard (packets/s, bytes/s, new
/// flows/s), one sample per tick.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ForecastSettings {
    /// Coverage of the prediction intervals; the predictive policy plans with their
    /// upper bound.
    pub level: f64,
    /// Every series is refitted once per this many ticks. The refits are spread over
    /// the ticks (a share of the series each tick), so no tick pays for all of them.
    pub refit_ticks: u64,
    /// Samples kept per series (the bounded history the models are fitted on).
    pub history: usize,
    /// Seasonal periods in ticks; empty to detect each series' own when its model is
    /// chosen.
    pub periods: Vec<usize>,
}

/// Moving established flows with their shards.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationSettings {
    /// Hand long-lived tracked flows off to their shard's new node (`HandOffFlows`)
    /// when the planner wants them off a node (draining, or overloaded). Only where
    /// the nodes carry a flow's state over themselves (shared or synchronised
    /// connection state): the agent moves the NIC's steering, not the node's state.
    pub hand_off: bool,
    /// Flows younger than this stay where they are: most short flows end before a
    /// handoff pays off.
    pub min_age_ms: u64,
    /// Connection state a node exports per handed-off flow, as recorded in each
    /// migration's `state_bytes` (the agent does not see the nodes' transfer).
    pub state_bytes_per_flow: u64,
    /// Flows handed off per tick at most.
    pub max_flows_per_tick: usize,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// The telemetry ring holds 2^ring_log2 entries.
    pub ring_log2: u32,
    /// Counter snapshots every this many ms of NIC time.
    pub snapshot_ms: u32,
}

/// The in-process emulated NIC and its synthetic traffic. With a separate device only
/// the defaults are accepted: a value set here would have no effect, and silently.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EmulatedSettings {
    /// Data-plane configuration of the image the emulated NIC boots; the embedded
    /// default without it.
    pub nic_config: Option<PathBuf>,
    /// Flows sending at once.
    pub flows: u32,
    /// Flows that start (and as many that end with an RST) per tick.
    pub new_flows_per_tick: u32,
    /// Packets offered per tick, spread over the sending flows.
    pub packets_per_tick: u32,
    pub seed: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    pub id: u16,
    /// What the node can take, Gbit/s.
    #[serde(default = "default_capacity")]
    pub capacity_gbps: f64,
    /// The node's Prometheus endpoint (node_exporter), `http://HOST:PORT/metrics`: its
    /// load comes from there, and it is marked down when it stops answering.
    pub metrics_url: Option<String>,
}

fn default_capacity() -> f64 {
    10.0
}

/// Default address of the API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            device: DeviceSpec::InProcess,
            listen: SocketAddr::from(([127, 0, 0, 1], 9477)),
            token: None,
            log_format: LogFormat::Human,
            tick_ms: 100,
            shutdown_timeout_ms: 5_000,
            down_after_ms: 3_000,
            max_tracked_flows: 2_000_000,
            node_scrape_ms: 1_000,
            command_ring_log2: 12,
            policy: Policy::Static,
            planner: PlannerConfig::default(),
            node_warmup_ms: 60_000,
            forecast: ForecastSettings::default(),
            migration: MigrationSettings::default(),
            telemetry: TelemetrySettings::default(),
            emulated: EmulatedSettings::default(),
            nodes: Vec::new(),
        }
    }
}

impl Default for ForecastSettings {
    fn default() -> Self {
        ForecastSettings {
            level: 0.8,
            refit_ticks: 600,
            history: 600,
            periods: Vec::new(),
        }
    }
}

impl Default for MigrationSettings {
    fn default() -> Self {
        MigrationSettings {
            hand_off: false,
            min_age_ms: 10_000,
            state_bytes_per_flow: 512,
            max_flows_per_tick: 1_024,
        }
    }
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            ring_log2: 16,
            snapshot_ms: 100,
        }
    }
}

impl Default for EmulatedSettings {
    fn default() -> Self {
        EmulatedSettings {
            nic_config: None,
            flows: 20_000,
            new_flows_per_tick: 200,
            packets_per_tick: 20_000,
            seed: 1,
        }
    }
}

impl AgentConfig {
    /// Check every value; the error names the key and says what is allowed.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, why: String| Err((key.to_string(), why));
        if !(10..=60_000).contains(&self.tick_ms) {
            return bad("tick_ms", format!("{} is outside 10..=60000", self.tick_ms));
        }
        if !(100..=600_000).contains(&self.shutdown_timeout_ms) {
            return bad(
                "shutdown_timeout_ms",
                format!("{} is outside 100..=600000", self.shutdown_timeout_ms),
            );
        }
        if self.down_after_ms < 2 * self.tick_ms {
            return bad(
                "down_after_ms",
                format!(
                    "{} must be at least two ticks ({} ms), or every pause would mark nodes down",
                    self.down_after_ms,
                    2 * self.tick_ms
                ),
            );
        }
        if self.max_tracked_flows == 0 || self.max_tracked_flows > 50_000_000 {
            return bad(
                "max_tracked_flows",
                format!("{} is outside 1..=50000000", self.max_tracked_flows),
            );
        }
        if !(50..=60_000).contains(&self.node_scrape_ms) {
            return bad(
                "node_scrape_ms",
                format!("{} is outside 50..=60000", self.node_scrape_ms),
            );
        }
        let max_cmd = hdl_bindings::ring::MAX_CMD_RING_LOG2;
        if !(4..=max_cmd).contains(&self.command_ring_log2) {
            return bad(
                "command_ring_log2",
                format!("{} is outside 4..={max_cmd}", self.command_ring_log2),
            );
        }
        if let Err(e) = self.planner.validate() {
            // The planner's messages start with the key they are about.
            let (key, why) = e.split_once(' ').unwrap_or(("planner", e.as_str()));
            return bad(key, why.to_string());
        }
        if self.node_warmup_ms > 86_400_000 {
            return bad(
                "node_warmup_ms",
                format!("{} is more than a day (86400000)", self.node_warmup_ms),
            );
        }
        let f = &self.forecast;
        if !(f.level > 0.0 && f.level < 1.0) {
            return bad(
                "forecast.level",
                format!("{} must lie strictly between 0 and 1", f.level),
            );
        }
        if !(1..=100_000).contains(&f.refit_ticks) {
            return bad(
                "forecast.refit_ticks",
                format!("{} is outside 1..=100000", f.refit_ticks),
            );
        }
        if !(30..=100_000).contains(&f.history) {
            return bad(
                "forecast.history",
                format!(
                    "{} is outside 30..=100000 (models need a few dozen samples)",
                    f.history
                ),
            );
        }
        if let Some(p) = f.periods.iter().find(|p| **p < 2 || 2 * **p >= f.history) {
            return bad(
                "forecast.periods",
                format!(
                    "period {p} must be at least 2 and fit twice in forecast.history ({})",
                    f.history
                ),
            );
        }
        if self.migration.max_flows_per_tick == 0 || self.migration.max_flows_per_tick > 65_536 {
            return bad(
                "migration.max_flows_per_tick",
                format!("{} is outside 1..=65536", self.migration.max_flows_per_tick),
            );
        }
        let max_telem = hdl_bindings::ring::MAX_TELEMETRY_RING_LOG2;
        if !(4..=max_telem).contains(&self.telemetry.ring_log2) {
            return bad(
                "telemetry.ring_log2",
                format!("{} is outside 4..={max_telem}", self.telemetry.ring_log2),
            );
        }
        if self.telemetry.snapshot_ms == 0 || self.telemetry.snapshot_ms > 60_000 {
            return bad(
                "telemetry.snapshot_ms",
                format!("{} is outside 1..=60000", self.telemetry.snapshot_ms),
            );
        }
        if self.token.as_ref().is_some_and(|t| t.0.len() < 16) {
            return bad(
                "token",
                "shorter than 16 characters; use e.g. `openssl rand -hex 32`".into(),
            );
        }
        let e = &self.emulated;
        if self.device != DeviceSpec::InProcess && *e != EmulatedSettings::default() {
            return bad(
                "emulated",
                format!(
                    "set, but device is \"{}\": [emulated] configures the in-process NIC only; a separate NIC gets its traffic from its own source (e.g. `flowshard nic-sim --pcap`)",
                    self.device
                ),
            );
        }
        if e.flows == 0 || e.flows > hw_sim::generate::MAX_FLOWS / 2 {
            return bad(
                "emulated.flows",
                format!(
                    "{} is outside 1..={}",
                    e.flows,
                    hw_sim::generate::MAX_FLOWS / 2
                ),
            );
        }
        if e.new_flows_per_tick > e.flows {
            return bad(
                "emulated.new_flows_per_tick",
                format!(
                    "{} is more than emulated.flows ({})",
                    e.new_flows_per_tick, e.flows
                ),
            );
        }
        if e.packets_per_tick > 10_000_000 {
            return bad(
                "emulated.packets_per_tick",
                format!("{} is more than 10000000", e.packets_per_tick),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !seen.insert(n.id) {
                return bad(
                    &format!("nodes[{i}].id"),
                    format!("node {} listed twice", n.id),
                );
            }
            if let Some(url) = &n.metrics_url {
                let host = url
                    .strip_prefix("http://")
                    .and_then(|r| r.split('/').next());
                if host.is_none_or(str::is_empty) {
                    return bad(
                        &format!("nodes[{i}].metrics_url"),
                        format!("`{url}` is not an http://HOST:PORT/PATH address"),
                    );
                }
                if self.down_after_ms < 2 * self.node_scrape_ms {
                    return bad(
                        "down_after_ms",
                        format!(
                            "{} must be at least two scrapes (node_scrape_ms {}), or one slow scrape would mark node {} down",
                            self.down_after_ms, self.node_scrape_ms, n.id
                        ),
                    );
                }
            }
            if !(n.capacity_gbps.is_finite() && n.capacity_gbps > 0.0) {
                return bad(
                    &format!("nodes[{i}].capacity_gbps"),
                    format!("{} is not a positive number", n.capacity_gbps),
                );
            }
        }
        Ok(())
    }

    /// Capacity of node `id`, Gbit/s.
    pub fn capacity_gbps(&self, id: u16) -> f64 {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .map_or_else(default_capacity, |n| n.capacity_gbps)
    }
}

/// Load and validate an agent configuration; `None` gives the defaults.
pub fn load(path: Option<&Path>) -> Result<AgentConfig, ConfigFileError> {
    let Some(path) = path else {
        return Ok(AgentConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parse configuration text; `path` names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<AgentConfig, ConfigFileError> {
    let config: AgentConfig = toml::from_str(text).map_err(|e| ConfigFileError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })?;
    config
        .validate()
        .map_err(|(key, why)| ConfigFileError::Invalid {
            path: path.to_owned(),
            message: format!("`{key}`: {why}"),
        })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text, Path::new("agent.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_example_file_is_valid() {
        let text = include_str!("../../flowshard.agent.example.toml");
        let c = parse(text, Path::new("flowshard.agent.example.toml")).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.device, DeviceSpec::InProcess);
        assert!(c.token.is_some());
        assert_eq!(
            c.planner,
            PlannerConfig {
                max_active: 1024,
                ..PlannerConfig::default()
            }
        );
        assert_eq!(c.forecast, ForecastSettings::default());
        assert_eq!(c.migration, MigrationSettings::default());
        assert_eq!(parse("", Path::new("x")).unwrap(), AgentConfig::default());
    }

    #[test]
    fn bad_files_name_the_key_and_the_reason() {
        let e = err("tick_ms = 100\nlisen = \"1.2.3.4:5\"");
        assert!(e.starts_with("agent.toml: "), "{e}");
        assert!(e.contains("unknown field `lisen`"), "{e}");
        assert!(err("tick_ms = \"fast\"").contains("invalid type: string \"fast\""));
        assert!(err("listen = \"localhost\"").contains("invalid socket address"));
        assert!(err("device = \"usb:1\"").contains("expected \"in-process\""));
        assert!(err("device = \"pci:3:0.0\"").contains("not a PCI address"));
        let e = err("device = \"vfio-user:/run/nic.sock\"\n[emulated]\nflows = 5");
        assert!(
            e.contains("`emulated`: set, but device is \"vfio-user:/run/nic.sock\""),
            "{e}"
        );
        assert!(err("tick_ms = 1").contains("`tick_ms`: 1 is outside 10..=60000"));
        assert!(err("tick_ms = 1000\ndown_after_ms = 1000").contains("`down_after_ms`"));
        assert!(err("token = \"short\"").contains("`token`: shorter than 16"));
        assert!(err("[telemetry]\nring_log2 = 30").contains("`telemetry.ring_log2`"));
        assert!(err("[emulated]\nflowz = 3").contains("unknown field `flowz`"));
        let e = err("[[nodes]]\nid = 1\n[[nodes]]\nid = 1");
        assert!(e.contains("`nodes[1].id`: node 1 listed twice"), "{e}");
        let e = err("[[nodes]]\nid = 2\nmetrics_url = \"https://n2:9100/metrics\"");
        assert!(e.contains("`nodes[0].metrics_url`"), "{e}");
        let e = err(
            "down_after_ms = 1000\n[[nodes]]\nid = 2\nmetrics_url = \"http://n2:9100/metrics\"",
        );
        assert!(
            e.contains("`down_after_ms`: 1000 must be at least two scrapes"),
            "{e}"
        );
        let e = err("[[nodes]]\nid = 2\ncapacity_gbps = -1.0");
        assert!(
            e.contains("`nodes[0].capacity_gbps`: -1 is not a positive"),
            "{e}"
        );
    }

    #[test]
    fn policy_planner_and_forecast_keys_are_read_and_checked() {
        let c = parse(
            "policy = \"predictive\"\n[planner]\nmin_active = 2\nobserve_only = true\n\
             sharded_classes = [\"video\"]\n[forecast]\nlevel = 0.9\nrefit_ticks = 10\n\
             history = 100\nperiods = [24]\n[migration]\nhand_off = true",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.policy, Policy::Predictive);
        assert_eq!(c.planner.min_active, 2);
        assert!(c.planner.observe_only && c.migration.hand_off);
        assert_eq!(c.planner.sharded_classes, vec![nic_firmware::Class::Video]);
        assert_eq!(
            (c.forecast.refit_ticks, c.forecast.periods.clone()),
            (10, vec![24])
        );
        let e = err("policy = \"psychic\"");
        assert!(
            e.contains(
                "unknown variant `psychic`, expected one of `static`, `reactive`, `predictive`"
            ),
            "{e}"
        );
        let e = err("[planner]\ntarget_utilisaton = 0.5");
        assert!(e.contains("unknown field `target_utilisaton`"), "{e}");
        let e = err("[planner]\ntarget_utilisation = 1.5");
        assert!(
            e.contains("`planner.target_utilisation`: must lie in (0, 1], got 1.5"),
            "{e}"
        );
        let e = err("[planner]\nmin_active = 0");
        assert!(e.contains("`planner.min_active`"), "{e}");
        let e = err("[planner]\nhigh_utilisation = 0.5");
        assert!(
            e.contains("`planner.high_utilisation`: must not be below"),
            "{e}"
        );
        let e = err("[planner]\nsharded_classes = [\"cat-videos\"]");
        assert!(e.contains("unknown variant `cat-videos`"), "{e}");
        assert!(err("[forecast]\nlevel = 1.0").contains("`forecast.level`"));
        assert!(err("[forecast]\nrefit_ticks = 0").contains("`forecast.refit_ticks`"));
        assert!(err("[forecast]\nhistory = 5").contains("`forecast.history`: 5 is outside"));
        let e = err("[forecast]\nhistory = 100\nperiods = [60]");
        assert!(e.contains("`forecast.periods`: period 60 must be"), "{e}");
        assert!(err("[forecast]\nlevl = 0.5").contains("unknown field `levl`"));
        let e = err("[migration]\nmax_flows_per_tick = 0");
        assert!(e.contains("`migration.max_flows_per_tick`"), "{e}");
        assert!(err("node_warmup_ms = 99999999999").contains("`node_warmup_ms`"));
    }

    #[test]
    fn separate_devices_are_parsed_and_pci_addresses_normalised() {
        let c = parse("device = \"vfio-user:/run/nic.sock\"", Path::new("x")).unwrap();
        assert_eq!(c.device, DeviceSpec::VfioUser("/run/nic.sock".into()));
        let c = parse("device = \"pci:0000:AF:00.1\"", Path::new("x")).unwrap();
        assert_eq!(c.device, DeviceSpec::Pci("0000:af:00.1".into()));
        assert_eq!(c.device.to_string(), "pci:0000:af:00.1");
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let c = parse("token = \"0123456789abcdef0123\"", Path::new("x")).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        let t = c.token.unwrap();
        assert!(t.matches("0123456789abcdef0123") && !t.matches("0123456789abcdef0124"));
    }
}
