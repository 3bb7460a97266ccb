//! The plan stage: how many nodes run, which shard sits on which node, and over how
//! many shards each class spreads its large flows — decided from measured load and,
//! under the predictive policy, from forecasts a node warm-up ahead. Sans-I/O: one
//! [`Planner::decide`] per control-loop tick over explicit [`Inputs`], returning the
//! [`Actions`] the rebalance stage turns into one command batch.
//!
//! Policies ([`Policy`]):
//! - `static`: every node on, the shard table as the image placed it, nothing moves;
//! - `reactive`: Kubernetes' HPA rule on measured utilisation — `desired = ⌈active ×
//!   utilisation / target⌉`, scaling up at once and down only to the highest desired
//!   count of a stabilisation window — plus threshold-triggered shard moves;
//! - `predictive`: the node count a forecast's upper quantile needs once a node started
//!   now is warm, and a scale-down only when the forecast says the node will not be
//!   needed again before a new one could warm up; the reactive rules stay on as a
//!   safety net for what no forecast saw coming (flash crowds, failures).
//!
//! Placement ([`place_by_load`]) moves as few shards as the load allows, in the spirit
//! of Maglev's minimal disruption: a shard moves only off a node that leaves service or
//! carries more than its capacity share plus a tolerance, and moved shards go to the
//! node with the lowest resulting utilisation. A move only redirects a shard's new
//! flows; established flows stay pinned by the NIC (or are handed off, see the
//! simulator), so fewer moves also mean fewer flows on two nodes' books.

use nic_firmware::Class;
use serde::{Deserialize, Serialize};

/// Largest class group the NIC takes (`SetClassGroup`).
pub const MAX_GROUP: u8 = 8;

/// How the planner decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Static,
    Reactive,
    Predictive,
}

impl Policy {
    pub const ALL: [Policy; 3] = [Policy::Static, Policy::Reactive, Policy::Predictive];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Static => "static",
            Policy::Reactive => "reactive",
            Policy::Predictive => "predictive",
        }
    }
}

/// The planner's knobs; every one has a default that the embedded scenario uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlannerConfig {
    /// Utilisation the node count is planned for (HPA's target).
    pub target_utilisation: f64,
    /// Utilisation the predictive policy plans a forecast's upper bound for.
    pub forecast_utilisation: f64,
    /// Measured utilisation of a node above which shards move off it at once, and
    /// above which the predictive policy falls back on the reactive rule.
    pub high_utilisation: f64,
    /// HPA's tolerance: no scaling while measured/target is within 1 ± this.
    pub tolerance: f64,
    /// Ticks a reactive scale-down waits for: the highest count wanted in this window
    /// stays (the predictive policy looks this far past a warm-up ahead instead). Also the clean
    /// ticks a degraded node waits for before more of its capacity is counted again.
    pub scale_down_window: usize,
    /// Share of a node's capacity one class may take before its large flows are
    /// spread over more shards (flowlet sharding), up to [`MAX_GROUP`].
    pub group_share: f64,
    /// Classes whose large flows may be spread over several shards.
    pub sharded_classes: Vec<Class>,
    /// Shards moved per tick at most, besides those forced off nodes leaving service.
    pub max_moves_per_tick: usize,
    /// How far above its capacity share a node's load may be before shards move.
    pub imbalance_tolerance: f64,
    pub min_active: usize,
    pub max_active: usize,
    /// A node whose packets wait longer than this (ms) while its offered load is
    /// below the high mark is degraded: it serves less than its stated capacity.
    pub degraded_delay_ms: f64,
    /// A node that drops more than this share of its packets while its offered load
    /// is below the high mark is degraded too.
    pub degraded_drop_rate: f64,
    /// Record what would be done without doing it.
    pub observe_only: bool,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            target_utilisation: 0.7,
            forecast_utilisation: 0.85,
            high_utilisation: 0.9,
            tolerance: 0.1,
            scale_down_window: 3,
            group_share: 0.5,
            sharded_classes: vec![Class::Video, Class::Bulk],
            max_moves_per_tick: 64,
            imbalance_tolerance: 0.15,
            min_active: 1,
            max_active: usize::MAX,
            degraded_delay_ms: 20.0,
            degraded_drop_rate: 0.001,
            observe_only: false,
        }
    }
}

impl PlannerConfig {
    pub fn validate(&self) -> Result<(), String> {
        let unit = |name: &str, v: f64| {
            if v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err(format!("planner.{name} must lie in (0, 1], got {v}"))
            }
        };
        unit("target_utilisation", self.target_utilisation)?;
        unit("high_utilisation", self.high_utilisation)?;
        unit("forecast_utilisation", self.forecast_utilisation)?;
        unit("group_share", self.group_share)?;
        if !(0.0..1.0).contains(&self.tolerance) {
            return Err(format!(
                "planner.tolerance must lie in [0, 1), got {}",
                self.tolerance
            ));
        }
        if !(self.imbalance_tolerance >= 0.0 && self.imbalance_tolerance.is_finite()) {
            return Err(format!(
                "planner.imbalance_tolerance must be a number ≥ 0, got {}",
                self.imbalance_tolerance
            ));
        }
        if !(self.degraded_delay_ms > 0.0 && self.degraded_delay_ms.is_finite()) {
            return Err(format!(
                "planner.degraded_delay_ms must be a number > 0, got {}",
                self.degraded_delay_ms
            ));
        }
        if !(self.degraded_drop_rate > 0.0 && self.degraded_drop_rate <= 1.0) {
            return Err(format!(
                "planner.degraded_drop_rate must lie in (0, 1], got {}",
                self.degraded_drop_rate
            ));
        }
        if self.high_utilisation < self.target_utilisation {
            return Err("planner.high_utilisation must not be below target_utilisation".into());
        }
        if self.min_active == 0 || self.min_active > self.max_active {
            return Err(format!(
                "planner.min_active ({}) must be at least 1 and at most max_active ({})",
                self.min_active, self.max_active
            ));
        }
        Ok(())
    }
}

/// A node's power and service state as the planner manages it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Power {
    /// Standing by: no shards, no flows, not counted in node-hours.
    Off,
    /// Powered on, serving from `ready_tick` on; takes no flows yet.
    Warming { ready_tick: u64 },
    /// Takes shards and new flows.
    Active,
    /// Takes no new flows; off once its established flows ended or were handed off.
    Draining,
    /// Stopped answering: the NIC remaps its flows; back to `Off` once it answers.
    Failed,
}

impl Power {
    /// Drawing power (and counted in node-hours).
    pub fn is_on(self) -> bool {
        matches!(
            self,
            Power::Warming { .. } | Power::Active | Power::Draining
        )
    }
}

/// What a node reported over the last tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NodeInput {
    /// Offered load, packets per second.
    pub load: f64,
    /// Packets per second it can serve.
    pub capacity: f64,
    /// Established flows it still carries.
    pub flows: u64,
    /// It did not answer this tick.
    pub silent: bool,
    /// Queueing delay its packets meet at the end of the tick, ms.
    pub delay_ms: f64,
    /// Share of the packets offered to it over the tick that it dropped.
    pub drop_rate: f64,
}

/// One tick's inputs.
#[derive(Clone, Debug, Default)]
pub struct Inputs<'a> {
    pub tick: u64,
    /// Indexed by node id.
    pub nodes: &'a [NodeInput],
    /// Measured load per shard, packets per second.
    pub shard_load: &'a [f64],
    /// Measured load per class (by [`Class`] index).
    pub class_load: &'a [f64],
    /// Upper quantile of the total load for the next ticks (index 0 = next tick); only
    /// the predictive policy reads it.
    pub total_upper: &'a [f64],
    /// The same per class, for class groups.
    pub class_upper: &'a [Vec<f64>],
}

/// A shard placed on another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ShardMove {
    pub shard: u16,
    pub from: u16,
    pub to: u16,
}

/// What one tick decided. Applied as one command batch (or, observe-only, recorded).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Actions {
    /// Nodes whose power state changed, with the new state.
    pub power: Vec<(u16, Power)>,
    pub moves: Vec<ShardMove>,
    /// Classes whose group size changed, with the new size.
    pub groups: Vec<(Class, u8)>,
    /// Nodes whose long-lived flows are worth handing off now: draining ones, and
    /// those above the high mark (their flows follow their shards' new nodes).
    pub hand_off_from: Vec<u16>,
    /// Why anything changed, for the log.
    pub reasons: Vec<String>,
}

impl Actions {
    pub fn is_empty(&self) -> bool {
        self.power.is_empty() && self.moves.is_empty() && self.groups.is_empty()
    }
}

/// The planner's state between ticks.
#[derive(Clone, Debug)]
pub struct Planner {
    policy: Policy,
    cfg: PlannerConfig,
    warmup_ticks: u64,
    power: Vec<Power>,
    shard_node: Vec<u16>,
    groups: Vec<u8>,
    /// Desired counts of recent ticks, newest last (the scale-down window).
    desired: std::collections::VecDeque<usize>,
    /// Per node, the share of its stated capacity the planner counts on: halved (or
    /// cut to the share it served, if less) each tick it is degraded, raised by [`DERATE_STEP`] (up to 1) after each
    /// `scale_down_window` clean ticks — TCP's additive increase, multiplicative
    /// decrease: a sick node sheds its load at once and is probed back slowly, so a
    /// lasting fault costs a few mild relapses rather than one full one per window.
    derate: Vec<f64>,
    /// Per node, clean ticks since its derating last changed.
    clean_ticks: Vec<usize>,
}

/// The least share of its capacity a degraded node is counted for.
const MIN_DERATE: f64 = 0.125;
/// Capacity share a degraded node gets back per clean window.
const DERATE_STEP: f64 = 0.125;

impl Planner {
    /// Start from the NIC's shard table and node states (`power`, indexed by node id).
    pub fn new(
        policy: Policy,
        cfg: PlannerConfig,
        warmup_ticks: u64,
        power: Vec<Power>,
        shard_node: Vec<u16>,
    ) -> Planner {
        let nodes = power.len();
        Planner {
            policy,
            cfg,
            warmup_ticks,
            power,
            shard_node,
            groups: vec![1; Class::COUNT],
            desired: std::collections::VecDeque::new(),
            derate: vec![1.0; nodes],
            clean_ticks: vec![0; nodes],
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn power(&self) -> &[Power] {
        &self.power
    }

    pub fn shard_node(&self) -> &[u16] {
        &self.shard_node
    }

    pub fn groups(&self) -> &[u8] {
        &self.groups
    }

    /// Per node, the share of its stated capacity planned with (below 1 after it was
    /// found degraded).
    pub fn derate(&self) -> &[f64] {
        &self.derate
    }

    /// Continue from tables changed outside the planner, as if it had decided them:
    /// the agent applies operators' requests (which win over the planner for the nodes
    /// they touch) and corrects decisions for nodes operators hold, then hands the
    /// result back here. The scale-down window and derating carry on.
    pub fn adopt(&mut self, power: Vec<Power>, shard_node: Vec<u16>) {
        self.power = power;
        self.shard_node = shard_node;
    }

    /// Decide one tick. Unless observe-only, the planner's own view (power, shard table,
    /// groups) moves to the decision: the caller applies it in one batch.
    pub fn decide(&mut self, input: &Inputs<'_>) -> Actions {
        let mut next = self.power.clone();
        let mut out = Actions::default();
        let derate = self.degradation(input, &mut out);
        let cap = |id: usize| input.nodes.get(id).map_or(0.0, |n| n.capacity) * derate[id];
        let load_of = |id: usize| input.nodes.get(id).map_or(0.0, |n| n.load);
        // Failures and recoveries, warm-ups done, drains finished.
        for (id, p) in next.iter_mut().enumerate() {
            let n = input.nodes.get(id).copied().unwrap_or_default();
            let new = match *p {
                _ if n.silent && *p != Power::Failed && *p != Power::Off => Power::Failed,
                // Static keeps every node on; the others start it again when needed.
                Power::Failed if !n.silent && self.policy == Policy::Static => Power::Active,
                Power::Failed if !n.silent => Power::Off,
                Power::Warming { ready_tick } if input.tick >= ready_tick => Power::Active,
                Power::Draining if n.flows == 0 => Power::Off,
                p => p,
            };
            if new != *p {
                if new == Power::Failed {
                    out.reasons.push(format!("node {id} stopped answering"));
                }
                *p = new;
            }
        }
        let active_ids = |next: &[Power]| -> Vec<usize> {
            (0..next.len())
                .filter(|&i| next[i] == Power::Active)
                .collect()
        };
        let load: f64 = input.nodes.iter().map(|n| n.load).sum();
        // The load a node is about to carry: measured, scaled by the growth the
        // forecast expects by the next tick (predictive only; never scaled down).
        let growth = match (self.policy, input.total_upper.first()) {
            (Policy::Predictive, Some(next)) if load > 0.0 => (next / load).max(1.0),
            _ => 1.0,
        };
        let expected = |id: usize| load_of(id) * growth;
        let node_cap = {
            let caps: Vec<f64> = (0..next.len()).map(cap).filter(|c| *c > 0.0).collect();
            caps.iter().sum::<f64>() / caps.len().max(1) as f64
        };
        if self.policy != Policy::Static {
            let active = active_ids(&next);
            let active_cap: f64 = active.iter().map(|&i| cap(i)).sum();
            let warming = next
                .iter()
                .filter(|p| matches!(p, Power::Warming { .. }))
                .count();
            let t = self.cfg.target_utilisation;
            // HPA: desired from measured utilisation, with its tolerance band.
            let util = if active_cap > 0.0 {
                load / active_cap
            } else {
                1.0
            };
            let reactive = if (util / t - 1.0).abs() <= self.cfg.tolerance {
                active.len()
            } else {
                (active.len().max(1) as f64 * util / t).ceil() as usize
            };
            let hot = active
                .iter()
                .any(|&i| load_of(i) > self.cfg.high_utilisation * cap(i));
            // The forecast's upper bound already holds the growth a measured load's
            // headroom is for, so it is planned to a higher utilisation.
            let f = self.cfg.forecast_utilisation;
            let need = |l: f64| (l / (f * node_cap)).ceil() as usize;
            let (up, hold) = match self.policy {
                Policy::Predictive if !input.total_upper.is_empty() => {
                    let w = self.warmup_ticks as usize;
                    let at = |i: usize| input.total_upper[i.min(input.total_upper.len() - 1)];
                    // Nodes started now serve from tick w on: plan for ticks w and w + 1.
                    let ahead = need(at(w).max(at(w + 1)));
                    // The safety net: the reactive rule when a node runs hot anyway.
                    let up = if hot { ahead.max(reactive) } else { ahead };
                    // Keep a node that is needed again before a new one could warm up and
                    // serve for a stabilisation window, and (HPA's tolerance band,
                    // against flapping) unless the others would stay below the planned
                    // utilisation by the tolerance.
                    let keep =
                        |l: f64| (l / (f * (1.0 - self.cfg.tolerance) * node_cap)).ceil() as usize;
                    let horizon = w + self.cfg.scale_down_window.max(1);
                    let hold = (0..=horizon).map(|i| keep(at(i))).max().unwrap_or(0);
                    (up, hold.max(keep(load)))
                }
                _ => (reactive, reactive),
            };
            // Against flapping, the reactive policy scales down only to the highest
            // count wanted over the stabilisation window, and not before it has
            // filled. The predictive one holds what its forecast wants over the next
            // warm-up and window: that look-ahead is its window.
            let window = match self.policy {
                Policy::Predictive if !input.total_upper.is_empty() => 1,
                _ => self.cfg.scale_down_window.max(1),
            };
            self.desired.push_back(hold);
            while self.desired.len() > window {
                self.desired.pop_front();
            }
            let hold = if self.desired.len() < window {
                active.len()
            } else {
                self.desired.iter().copied().max().unwrap_or(hold)
            };
            let max_on = self
                .cfg
                .max_active
                .min(next.iter().filter(|p| **p != Power::Failed).count());
            let up = up.clamp(self.cfg.min_active, max_on.max(self.cfg.min_active));
            let hold = hold.clamp(self.cfg.min_active, max_on.max(self.cfg.min_active));
            let planned = active.len() + warming;
            if up > planned {
                let mut more = up - planned;
                for (id, p) in next.iter_mut().enumerate() {
                    if more == 0 {
                        break;
                    }
                    if *p == Power::Draining {
                        // A draining node still holds its flows: it is back at once.
                        *p = Power::Active;
                        more -= 1;
                        out.reasons.push(format!("node {id} back from draining"));
                    }
                }
                for (id, p) in next.iter_mut().enumerate() {
                    if more == 0 {
                        break;
                    }
                    if *p == Power::Off {
                        *p = Power::Warming {
                            ready_tick: input.tick + self.warmup_ticks,
                        };
                        more -= 1;
                        out.reasons.push(format!(
                            "node {id} started: {} nodes wanted ({} utilisation {:.2})",
                            up,
                            self.policy.as_str(),
                            util
                        ));
                    }
                }
            } else if warming == 0 && hold < active.len() {
                // Drain the least loaded active nodes.
                let mut by_load = active.clone();
                by_load.sort_by(|a, b| load_of(*a).total_cmp(&load_of(*b)).then(b.cmp(a)));
                for id in by_load.into_iter().take(active.len() - hold) {
                    next[id] = Power::Draining;
                    out.reasons.push(format!(
                        "node {id} draining: {hold} nodes are enough ({})",
                        self.policy.as_str()
                    ));
                }
            }
        }
        // Placement over the nodes active after this tick.
        let targets: Vec<(u16, f64)> = active_ids(&next)
            .into_iter()
            .map(|i| (i as u16, cap(i).max(f64::MIN_POSITIVE)))
            .collect();
        let active_changed =
            (0..next.len()).any(|i| (next[i] == Power::Active) != (self.power[i] == Power::Active));
        let mut table = self.shard_node.clone();
        if self.policy != Policy::Static && !targets.is_empty() {
            let hot = targets
                .iter()
                .any(|(id, c)| expected(*id as usize) > self.cfg.high_utilisation * c);
            let stranded = table.iter().any(|n| !targets.iter().any(|t| t.0 == *n));
            if active_changed || hot || stranded {
                out.moves = place_by_load(
                    &mut table,
                    input.shard_load,
                    &targets,
                    self.cfg.imbalance_tolerance,
                    self.cfg.high_utilisation / growth,
                    self.cfg.max_moves_per_tick,
                );
            }
        }
        // Class groups: spread a class whose load would take more than `group_share`
        // of a node over more shards, and merge them back in troughs.
        if self.policy != Policy::Static && node_cap > 0.0 {
            for &c in &self.cfg.sharded_classes {
                let i = c as usize;
                let measured = input.class_load.get(i).copied().unwrap_or(0.0);
                let planned = match self.policy {
                    Policy::Predictive => input
                        .class_upper
                        .get(i)
                        .and_then(|u| {
                            let w = self.warmup_ticks as usize;
                            u.get(..=w.min(u.len().saturating_sub(1)))
                                .map(|s| s.iter().copied().fold(0.0, f64::max))
                        })
                        .unwrap_or(measured)
                        .max(measured),
                    _ => measured,
                };
                let g = ((planned / (self.cfg.group_share * node_cap)).ceil() as u8)
                    .clamp(1, MAX_GROUP);
                if g != self.groups[i] {
                    out.groups.push((c, g));
                }
            }
        }
        out.power = (0..next.len())
            .filter(|&i| next[i] != self.power[i])
            .map(|i| (i as u16, next[i]))
            .collect();
        // Long-lived flows leave draining nodes (so they can stop) and nodes that are
        // (or, predictive, are about to be) above the high mark, following their shards.
        out.hand_off_from = (0..next.len())
            .filter(|&i| {
                self.policy != Policy::Static
                    && (next[i] == Power::Draining
                        || (next[i] == Power::Active
                            && expected(i) > self.cfg.high_utilisation * cap(i)))
            })
            .map(|i| i as u16)
            .collect();
        if !self.cfg.observe_only {
            self.derate = derate;
            self.power = next;
            self.shard_node = table;
            for (c, g) in &out.groups {
                self.groups[*c as usize] = *g;
            }
        }
        out
    }
}

impl Planner {
    /// The degradation trigger: per node, the capacity share to plan with this tick.
    /// A node is degraded when its packets queue or drop past the configured marks
    /// while its offered load is below the high mark — load does not explain it, so
    /// the node serves less than it states. Its planned capacity halves, which makes
    /// it hot: placement sheds its shards and its long-lived flows are handed off.
    fn degradation(&mut self, input: &Inputs<'_>, out: &mut Actions) -> Vec<f64> {
        let mut derate = self.derate.clone();
        derate.resize(self.power.len(), 1.0);
        self.clean_ticks.resize(self.power.len(), 0);
        if self.policy == Policy::Static {
            return derate;
        }
        for (id, d) in derate.iter_mut().enumerate() {
            let Some(n) = input.nodes.get(id) else {
                continue;
            };
            let degraded = self.power[id] == Power::Active
                && !n.silent
                && n.load <= self.cfg.high_utilisation * n.capacity * *d
                && (n.delay_ms > self.cfg.degraded_delay_ms
                    || n.drop_rate > self.cfg.degraded_drop_rate);
            if degraded {
                // A node that drops with a full queue serves what it did not drop: that
                // is what it can do now, when it is less than half what was planned.
                let served = if n.drop_rate > self.cfg.degraded_drop_rate && n.capacity > 0.0 {
                    n.load * (1.0 - n.drop_rate) / n.capacity
                } else {
                    1.0
                };
                *d = (*d * 0.5).min(served).max(MIN_DERATE);
                self.clean_ticks[id] = 0;
                out.reasons.push(format!(
                    "node {id} degraded: {:.1} ms queueing, {:.2} % dropped at {:.0} % of its \
                     capacity; planned at {:.0} % of it",
                    n.delay_ms,
                    n.drop_rate * 100.0,
                    n.load / n.capacity.max(f64::MIN_POSITIVE) * 100.0,
                    *d * 100.0
                ));
            } else if *d < 1.0 {
                self.clean_ticks[id] += 1;
                if self.clean_ticks[id] >= self.cfg.scale_down_window.max(1) {
                    *d = (*d + DERATE_STEP).min(1.0);
                    self.clean_ticks[id] = 0;
                }
            }
        }
        derate
    }
}

/// Place shards over `targets` (node id, capacity) so that no node carries more than
/// its capacity share of the total load by more than `tolerance`, nor (once loads are
/// measured, in the capacities' unit) more than `ceiling` of its capacity where its
/// share leaves room for that, moving as few shards as that allows.
///
/// Shards on a node that is not a target always move. A node above its limit sheds,
/// largest first, the shards whose load still fits in its excess (then the smallest
/// one), at most `max_moves` shards in all. Every freed shard, heaviest first, goes to
/// the node it leaves least utilised. With no load measured yet every shard counts
/// as one, so the table is spread by capacity. Deterministic: ties go to the lower id.
pub fn place_by_load(
    table: &mut [u16],
    load: &[f64],
    targets: &[(u16, f64)],
    tolerance: f64,
    ceiling: f64,
    max_moves: usize,
) -> Vec<ShardMove> {
    if targets.is_empty() || table.is_empty() {
        return Vec::new();
    }
    let measured: f64 = load.iter().take(table.len()).filter(|l| **l > 0.0).sum();
    let weight = |s: usize| {
        if measured > 0.0 {
            load.get(s).copied().filter(|l| *l > 0.0).unwrap_or(0.0)
        } else {
            1.0
        }
    };
    let total: f64 = (0..table.len()).map(weight).sum();
    let cap_total: f64 = targets.iter().map(|t| t.1).sum();
    let max_id = targets.iter().map(|t| t.0).max().unwrap_or(0) as usize;
    let mut slot = vec![usize::MAX; max_id + 1];
    for (i, t) in targets.iter().enumerate() {
        slot[t.0 as usize] = i;
    }
    let target_of = |node: u16| {
        slot.get(node as usize)
            .copied()
            .filter(|i| *i != usize::MAX)
    };
    let mut node_load = vec![0.0; targets.len()];
    let mut owned: Vec<Vec<usize>> = vec![Vec::new(); targets.len()];
    let mut pool: Vec<(usize, u16)> = Vec::new();
    for (s, n) in table.iter().enumerate() {
        match target_of(*n) {
            Some(i) => {
                node_load[i] += weight(s);
                owned[i].push(s);
            }
            None => pool.push((s, *n)),
        }
    }
    let fair = |i: usize| total * targets[i].1 / cap_total;
    let mut budget = max_moves;
    // A share above the ceiling cannot be helped by moving shards; the node count can.
    let limit = |i: usize| {
        let l = fair(i) * (1.0 + tolerance);
        if measured > 0.0 {
            l.min(fair(i).max(ceiling * targets[i].1))
        } else {
            l
        }
    };
    for i in 0..targets.len() {
        let limit = limit(i);
        if node_load[i] <= limit || budget == 0 {
            continue;
        }
        let mut mine = std::mem::take(&mut owned[i]);
        mine.sort_by(|a, b| weight(*b).total_cmp(&weight(*a)).then(a.cmp(b)));
        while node_load[i] > limit && budget > 0 && !mine.is_empty() {
            let excess = node_load[i] - fair(i);
            let pick = mine
                .iter()
                .position(|s| weight(*s) <= excess)
                .unwrap_or(mine.len() - 1);
            let s = mine.remove(pick);
            node_load[i] -= weight(s);
            pool.push((s, targets[i].0));
            budget -= 1;
        }
    }
    pool.sort_by(|a, b| weight(b.0).total_cmp(&weight(a.0)).then(a.0.cmp(&b.0)));
    let mut moves = Vec::with_capacity(pool.len());
    for (s, from) in pool {
        let w = weight(s);
        let mut best = 0;
        let mut best_u = f64::INFINITY;
        for (i, t) in targets.iter().enumerate() {
            let u = (node_load[i] + w) / t.1;
            if u < best_u {
                best_u = u;
                best = i;
            }
        }
        node_load[best] += w;
        let to = targets[best].0;
        table[s] = to;
        if to != from {
            moves.push(ShardMove {
                shard: s as u16,
                from,
                to,
            });
        }
    }
    moves.sort_by_key(|m| m.shard);
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node_loads(table: &[u16], load: &[f64], nodes: usize) -> Vec<f64> {
        let mut out = vec![0.0; nodes];
        for (s, n) in table.iter().enumerate() {
            out[*n as usize] += load[s];
        }
        out
    }

    #[test]
    fn spreads_an_unmeasured_table_by_capacity() {
        let mut table = vec![0u16; 64];
        let moves = place_by_load(
            &mut table,
            &[],
            &[(0, 1.0), (1, 1.0), (2, 2.0)],
            0.0,
            f64::INFINITY,
            64,
        );
        let counts = |n| table.iter().filter(|x| **x == n).count();
        assert_eq!((counts(0), counts(1), counts(2)), (16, 16, 32));
        assert_eq!(moves.len(), 48);
    }

    #[test]
    fn a_leaving_node_moves_only_its_own_shards() {
        let mut table: Vec<u16> = (0..64).map(|s| (s % 4) as u16).collect();
        let before = table.clone();
        let load = vec![1.0; 64];
        let moves = place_by_load(
            &mut table,
            &load,
            &[(0, 1.0), (1, 1.0), (2, 1.0)],
            0.2,
            f64::INFINITY,
            64,
        );
        assert_eq!(moves.len(), 16, "only node 3's shards move");
        for (s, (a, b)) in before.iter().zip(&table).enumerate() {
            if *a != 3 {
                assert_eq!(a, b, "shard {s} moved off a node that stays");
            }
        }
        assert!(table.iter().all(|n| *n != 3));
    }

    #[test]
    fn a_new_node_takes_load_from_the_others_only() {
        let mut table: Vec<u16> = (0..64).map(|s| (s % 3) as u16).collect();
        let load: Vec<f64> = (0..64).map(|s| 1.0 + (s % 5) as f64).collect();
        let targets = [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)];
        let moves = place_by_load(&mut table, &load, &targets, 0.1, f64::INFINITY, 64);
        assert!(moves.iter().all(|m| m.to == 3), "{moves:?}");
        let loads = node_loads(&table, &load, 4);
        let fair = load.iter().sum::<f64>() / 4.0;
        let biggest = 5.0;
        for (n, l) in loads.iter().enumerate() {
            assert!(*l <= fair * 1.1 + biggest, "node {n}: {l} vs fair {fair}");
        }
    }

    #[test]
    fn no_node_is_left_above_the_ceiling_its_share_allows() {
        // Node 0 carries 95 of 170 on two nodes of 100: within 15 % of its fair 85,
        // but above a 0.9 ceiling, so it sheds down to 90.
        let mut table: Vec<u16> = (0..20).map(|s| if s < 19 { 0 } else { 1 }).collect();
        let mut load = vec![5.0; 20];
        load[19] = 75.0;
        let targets = [(0, 100.0), (1, 100.0)];
        let mut loose = table.clone();
        assert!(place_by_load(&mut loose, &load, &targets, 0.15, f64::INFINITY, 64).is_empty());
        let moves = place_by_load(&mut table, &load, &targets, 0.15, 0.9, 64);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(node_loads(&table, &load, 2), vec![90.0, 80.0]);
        // Where the whole load needs more than the ceiling, shares are the limit.
        let mut table = vec![0u16, 0, 1, 1];
        let load = [50.0; 4];
        assert!(place_by_load(&mut table, &load, &targets, 0.0, 0.9, 64).is_empty());
    }

    #[test]
    fn the_move_budget_bounds_voluntary_moves_but_not_forced_ones() {
        let mut table: Vec<u16> = (0..64).map(|s| if s < 48 { 0 } else { 2 }).collect();
        let load = vec![1.0; 64];
        let moves = place_by_load(
            &mut table,
            &load,
            &[(0, 1.0), (1, 1.0)],
            0.0,
            f64::INFINITY,
            4,
        );
        // 16 forced off node 2, 4 voluntary off node 0.
        assert_eq!(moves.len(), 20);
        assert_eq!(moves.iter().filter(|m| m.from == 0).count(), 4);
    }

    proptest! {
        /// Whatever the loads: no shard stays on a non-target, shards of nodes within
        /// their limit never move, and every node ends within its limit plus one shard.
        #[test]
        fn placement_invariants(
            owners in proptest::collection::vec(0u16..6, 1..300),
            loads in proptest::collection::vec(0.0f64..100.0, 300),
            shares in proptest::collection::vec(1.0f64..4.0, 4),
            headroom in 0.8f64..2.0,
            tol in 0.0f64..0.5,
            ceiling in 0.5f64..1.0,
        ) {
            let load = &loads[..owners.len()];
            let total: f64 = load.iter().sum();
            let share_total: f64 = shares.iter().sum();
            // Capacities in the loads' unit, `headroom` times what the load needs.
            let caps: Vec<f64> = shares.iter().map(|c| c * total / share_total * headroom + 1e-9).collect();
            let cap_total: f64 = caps.iter().sum();
            let targets: Vec<(u16, f64)> = caps.iter().enumerate().map(|(i, c)| (i as u16, *c)).collect();
            let mut table = owners.clone();
            let moves = place_by_load(&mut table, load, &targets, tol, ceiling, usize::MAX);
            prop_assert!(table.iter().all(|n| *n < 4));
            let before = node_loads(&owners, load, 6);
            let biggest = load.iter().copied().fold(0.0, f64::max);
            let after = node_loads(&table, load, 6);
            for (i, c) in caps.iter().enumerate() {
                let fair = total * c / cap_total;
                let limit = if total > 0.0 {
                    (fair * (1.0 + tol)).min(fair.max(ceiling * c))
                } else {
                    fair * (1.0 + tol)
                };
                if before[i] <= limit {
                    for (s, o) in owners.iter().enumerate() {
                        if *o as usize == i {
                            prop_assert_eq!(table[s], *o, "shard {} left a node within its limit", s);
                        }
                    }
                }
                prop_assert!(after[i] <= limit + biggest + 1e-9,
                    "node {} carries {} > limit {} + {}", i, after[i], limit, biggest);
            }
            for m in &moves {
                prop_assert_eq!(table[m.shard as usize], m.to);
                prop_assert_eq!(owners[m.shard as usize], m.from);
            }
        }
    }

    fn inputs(load_per_node: f64, nodes: usize, cap: f64) -> Vec<NodeInput> {
        (0..nodes)
            .map(|_| NodeInput {
                load: load_per_node,
                capacity: cap,
                flows: 10,
                ..NodeInput::default()
            })
            .collect()
    }

    fn planner(policy: Policy, on: usize, nodes: usize) -> Planner {
        let power = (0..nodes)
            .map(|i| if i < on { Power::Active } else { Power::Off })
            .collect();
        let table = (0..64).map(|s| (s % on) as u16).collect();
        let cfg = PlannerConfig {
            min_active: 1,
            max_active: nodes,
            ..PlannerConfig::default()
        };
        Planner::new(policy, cfg, 2, power, table)
    }

    #[test]
    fn reactive_scales_up_on_measured_load_and_waits_for_warm_up() {
        let mut p = planner(Policy::Reactive, 2, 8);
        // Two nodes at 95 % with target 70 %: ceil(2 × 0.95 / 0.7) = 3.
        let mut nodes = inputs(95.0, 8, 100.0);
        for n in &mut nodes[2..] {
            n.load = 0.0;
        }
        let a = p.decide(&Inputs {
            tick: 10,
            nodes: &nodes,
            ..Inputs::default()
        });
        assert_eq!(a.power, vec![(2, Power::Warming { ready_tick: 12 })]);
        assert!(a.moves.is_empty(), "a warming node takes no shard");
        let a = p.decide(&Inputs {
            tick: 12,
            nodes: &nodes,
            ..Inputs::default()
        });
        assert_eq!(a.power, vec![(2, Power::Active)]);
        assert!(a.moves.iter().all(|m| m.to == 2) && !a.moves.is_empty());
    }

    #[test]
    fn predictive_starts_nodes_a_warm_up_ahead_of_the_forecast_peak() {
        let mut p = planner(Policy::Predictive, 2, 8);
        let mut nodes = inputs(50.0, 8, 100.0);
        for n in &mut nodes[2..] {
            n.load = 0.0;
        }
        // Measured 50 % now, but 400 pps forecast from tick 2 on: 5 nodes at 85 %.
        let upper = [100.0, 100.0, 400.0, 400.0, 400.0, 400.0, 400.0, 400.0];
        let a = p.decide(&Inputs {
            tick: 0,
            nodes: &nodes,
            total_upper: &upper,
            ..Inputs::default()
        });
        let started = a
            .power
            .iter()
            .filter(|(_, s)| matches!(s, Power::Warming { .. }))
            .count();
        assert_eq!(started, 3);
        // The reactive policy sees nothing to do yet.
        let mut r = planner(Policy::Reactive, 2, 8);
        let a = r.decide(&Inputs {
            tick: 0,
            nodes: &nodes,
            ..Inputs::default()
        });
        assert!(a.power.is_empty());
    }

    #[test]
    fn scale_down_waits_for_the_window_and_drains() {
        let mut p = planner(Policy::Reactive, 4, 4);
        let nodes = inputs(10.0, 4, 100.0);
        let mut drained = 0;
        for tick in 0..5 {
            let a = p.decide(&Inputs {
                tick,
                nodes: &nodes,
                ..Inputs::default()
            });
            drained += a
                .power
                .iter()
                .filter(|(_, s)| *s == Power::Draining)
                .count();
            if tick < 2 {
                // desired = ceil(4 × 0.1 / 0.7) = 1, but the window is not full yet.
                assert!(a.power.is_empty(), "tick {tick}: {a:?}");
            }
        }
        assert_eq!(drained, 3);
        assert_eq!(p.power().iter().filter(|s| **s == Power::Active).count(), 1);
        assert!(
            p.shard_node()
                .iter()
                .all(|n| p.power()[*n as usize] == Power::Active)
        );
    }

    #[test]
    fn a_silent_node_fails_and_loses_its_shards() {
        let mut p = planner(Policy::Static, 4, 4);
        let mut nodes = inputs(50.0, 4, 100.0);
        nodes[1].silent = true;
        let a = p.decide(&Inputs {
            tick: 0,
            nodes: &nodes,
            ..Inputs::default()
        });
        assert_eq!(a.power, vec![(1, Power::Failed)]);
        assert!(a.moves.is_empty(), "static moves nothing");
        nodes[1].silent = false;
        let a = p.decide(&Inputs {
            tick: 1,
            nodes: &nodes,
            ..Inputs::default()
        });
        assert_eq!(
            a.power,
            vec![(1, Power::Active)],
            "static serves with every node"
        );
        nodes[1].silent = true;
        let mut r = planner(Policy::Reactive, 4, 4);
        let a = r.decide(&Inputs {
            tick: 0,
            nodes: &nodes,
            ..Inputs::default()
        });
        assert!(a.power.contains(&(1, Power::Failed)));
        assert_eq!(a.moves.iter().filter(|m| m.from == 1).count(), 16);
        assert!(r.shard_node().iter().all(|n| *n != 1));
    }

    #[test]
    fn a_degraded_node_sheds_load_and_recovers_slowly() {
        let mut p = planner(Policy::Reactive, 4, 4);
        let mut nodes = inputs(60.0, 4, 100.0);
        let shard_load = vec![60.0 * 4.0 / 64.0; 64];
        nodes[1].delay_ms = 200.0;
        let a = p.decide(&Inputs {
            tick: 0,
            nodes: &nodes,
            shard_load: &shard_load,
            ..Inputs::default()
        });
        assert_eq!(p.derate()[1], 0.5);
        assert!(a.reasons.iter().any(|r| r.starts_with("node 1 degraded")));
        assert!(a.hand_off_from.contains(&1), "{a:?}");
        let off = a.moves.iter().filter(|m| m.from == 1).count();
        assert!(
            off >= 6,
            "node 1 sheds about half its 16 shards, shed {off}"
        );
        assert!(a.moves.iter().all(|m| m.from == 1 && m.to != 1));
        // Clean again: an eighth of its capacity back per window of clean ticks.
        nodes[1].delay_ms = 0.0;
        for tick in 1..=12 {
            p.decide(&Inputs {
                tick,
                nodes: &nodes,
                shard_load: &shard_load,
                ..Inputs::default()
            });
            let want = 0.5 + 0.125 * (tick / 3) as f64;
            assert_eq!(p.derate()[1], want, "tick {tick}");
        }
    }

    #[test]
    fn queueing_that_load_explains_is_not_degradation() {
        for policy in [Policy::Reactive, Policy::Static] {
            let mut p = planner(policy, 4, 4);
            let mut nodes = inputs(60.0, 4, 100.0);
            // Overloaded: its queue is the load's doing, not the node's.
            nodes[2].load = 120.0;
            nodes[2].delay_ms = 500.0;
            nodes[2].drop_rate = 0.2;
            // Static never derates, whatever the node reports.
            nodes[3].drop_rate = if policy == Policy::Static { 0.5 } else { 0.0 };
            let a = p.decide(&Inputs {
                tick: 0,
                nodes: &nodes,
                ..Inputs::default()
            });
            assert!(p.derate().iter().all(|d| *d == 1.0), "{policy:?}: {a:?}");
            assert!(!a.reasons.iter().any(|r| r.contains("degraded")));
        }
    }

    #[test]
    fn observe_only_records_without_changing_its_view() {
        let mut p = planner(Policy::Reactive, 2, 8);
        p.cfg.observe_only = true;
        let nodes = inputs(95.0, 8, 100.0);
        let before = p.shard_node().to_vec();
        let a = p.decide(&Inputs {
            tick: 0,
            nodes: &nodes,
            ..Inputs::default()
        });
        assert!(!a.power.is_empty());
        assert_eq!(p.shard_node(), &before[..]);
        assert_eq!(p.power()[2], Power::Off);
    }
}
