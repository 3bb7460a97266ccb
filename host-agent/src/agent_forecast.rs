//! The agent's forecast stage, sans-I/O: one series per class, node and shard and per
//! metric (packets/s, bytes/s, new flows/s), one sample per control-loop tick, kept in
//! the [`Forecaster`]'s bounded histories.
//!
//! Fits are what costs: choosing a series' model is a rolling-origin backtest of five
//! models (40–500 ms on 600 samples, measured), refitting the chosen one a few ms. So
//! the stage does not fit: each tick it hands out [`Job`]s — `⌈series / refit_ticks⌉`
//! of them, round robin, so every series is refitted once per `refit_ticks` — and
//! takes their [`Done`] results back whenever they come. The agent runs the jobs on a
//! thread of their own, so a tick's forecast stage costs the samples and the hand-off,
//! not the fits; a series is never in two jobs at once, so a slow fitter delays
//! forecasts instead of piling work up. A series' model is chosen by
//! [`forecast::select`] at its first refit and again every [`RESELECT_EVERY`] refits;
//! in between the chosen model is refitted on the newest history. Between refits the
//! last forecast is read at the offset of the current tick.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::forecast::{self, Forecast, Forecaster, Metric, Model, Scope};

/// Refits between two model choices of a series.
pub const RESELECT_EVERY: u32 = 10;

/// Samples a series needs before it is forecast: ETS's minimum.
pub const MIN_SAMPLES: usize = 10;

/// Jobs out at once at most: with more series than the fitter keeps up with, the
/// refits due while it is this far behind are skipped to their next turn, so the
/// queue (a history copied into each job) stays small.
pub const MAX_IN_FLIGHT: usize = 64;

/// The last fit of one series.
#[derive(Clone, Debug, Default)]
struct Fit {
    model: Option<Model>,
    periods: Vec<usize>,
    refits: u32,
    /// A job for the series is out.
    in_flight: bool,
    /// Tick after whose sample the forecast was made: its step 0 is the next tick.
    made_at: u64,
    forecast: Option<Arc<Forecast>>,
    error: Option<String>,
}

/// One series' refit, to run wherever the fits may take their time.
#[derive(Clone, Debug)]
pub struct Job {
    key: (Scope, Metric),
    y: Vec<f64>,
    /// The model to refit; `None` to choose one by backtest.
    model: Option<Model>,
    /// The periods to use; `None` (choosing) to detect them when none are configured.
    periods: Option<Vec<usize>>,
    horizon: usize,
    level: f64,
    made_at: u64,
}

/// A job's outcome.
#[derive(Clone, Debug)]
pub struct Done {
    key: (Scope, Metric),
    made_at: u64,
    result: Result<(Forecast, Vec<usize>), String>,
}

impl Job {
    /// Fit and forecast. A model that fails (or panics, on a series it cannot take)
    /// falls back on seasonal naive; only when that fails too is the error kept.
    pub fn run(self) -> Done {
        let Job {
            key,
            y,
            model,
            periods,
            horizon,
            level,
            made_at,
        } = self;
        let fit = || match model {
            None => forecast::select(&y, periods.as_deref(), horizon, level)
                .map(|s| (s.forecast, s.periods)),
            Some(m) => {
                let p = periods.clone().unwrap_or_default();
                forecast::forecast(m, &y, &p, horizon, level)
                    .or_else(|_| forecast::forecast(Model::SeasonalNaive, &y, &p, horizon, level))
                    .map(|f| (f, p))
            }
        };
        let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(fit)) {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("the model panicked on this series".into()),
        };
        Done {
            key,
            made_at,
            result,
        }
    }
}

/// One series as `/forecast` shows it. The forecast is shared, not copied, so
/// publishing the view every tick costs no more than a reference per series.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeriesView {
    pub scope: &'static str,
    pub id: String,
    pub metric: &'static str,
    pub samples: usize,
    pub model: Option<Model>,
    pub periods: Vec<usize>,
    pub made_at_tick: u64,
    #[serde(skip)]
    pub forecast: Option<Arc<Forecast>>,
    pub error: Option<String>,
}

/// The forecast stage.
#[derive(Debug)]
pub struct ForecastStage {
    forecaster: Forecaster,
    periods: Option<Vec<usize>>,
    level: f64,
    horizon: usize,
    refit_ticks: u64,
    fits: BTreeMap<(Scope, Metric), Fit>,
    /// Where the round robin of refits goes on from.
    cursor: usize,
    in_flight: usize,
    refits_total: u64,
}

pub fn scope_parts(s: Scope) -> (&'static str, String) {
    match s {
        Scope::Class(c) => ("class", c.as_str().to_string()),
        Scope::Node(n) => ("node", n.to_string()),
        Scope::Shard(n) => ("shard", n.to_string()),
    }
}

pub fn metric_name(m: Metric) -> &'static str {
    match m {
        Metric::Packets => "packets_per_s",
        Metric::Bytes => "bytes_per_s",
        Metric::NewFlows => "new_flows_per_s",
    }
}

impl ForecastStage {
    /// `history` samples per series; forecasts `horizon` ticks ahead; `periods` in
    /// ticks (empty: detected per series).
    pub fn new(
        history: usize,
        periods: &[usize],
        level: f64,
        horizon: usize,
        refit_ticks: u64,
    ) -> ForecastStage {
        let periods = (!periods.is_empty()).then(|| periods.to_vec());
        ForecastStage {
            forecaster: Forecaster::new(history, periods.clone()),
            periods,
            level,
            horizon: horizon.max(1),
            refit_ticks: refit_ticks.max(1),
            fits: BTreeMap::new(),
            cursor: 0,
            in_flight: 0,
            refits_total: 0,
        }
    }

    pub fn horizon(&self) -> usize {
        self.horizon
    }

    pub fn level(&self) -> f64 {
        self.level
    }

    pub fn refits_total(&self) -> u64 {
        self.refits_total
    }

    /// Record tick `tick`'s samples; the refits due this tick, as jobs.
    pub fn observe(&mut self, tick: u64, samples: &[(Scope, Metric, f64)]) -> Vec<Job> {
        for &(scope, metric, v) in samples {
            self.forecaster
                .observe(scope, metric, if v.is_finite() { v } else { 0.0 });
            self.fits.entry((scope, metric)).or_default();
        }
        let n = self.fits.len();
        if n == 0 {
            return Vec::new();
        }
        let share = n.div_ceil(self.refit_ticks as usize);
        let keys: Vec<(Scope, Metric)> = self
            .fits
            .keys()
            .cycle()
            .skip(self.cursor % n)
            .take(share)
            .copied()
            .collect();
        self.cursor = (self.cursor + share) % n;
        keys.into_iter()
            .filter_map(|key| self.job(tick, key))
            .collect()
    }

    fn job(&mut self, tick: u64, key: (Scope, Metric)) -> Option<Job> {
        let history = self.forecaster.history(key.0, key.1)?;
        if history.len() < MIN_SAMPLES || self.in_flight >= MAX_IN_FLIGHT {
            return None;
        }
        let y = history.to_vec();
        let fit = self.fits.get_mut(&key)?;
        if fit.in_flight {
            return None;
        }
        fit.in_flight = true;
        self.in_flight += 1;
        let choose = fit.model.is_none() || fit.refits % RESELECT_EVERY == 0;
        fit.refits = fit.refits.wrapping_add(1);
        Some(Job {
            key,
            y,
            model: if choose { None } else { fit.model },
            periods: if choose {
                self.periods.clone()
            } else {
                Some(fit.periods.clone())
            },
            horizon: self.horizon,
            level: self.level,
            made_at: tick,
        })
    }

    /// Take a job's result back.
    pub fn done(&mut self, d: Done) {
        let Some(fit) = self.fits.get_mut(&d.key) else {
            return;
        };
        if fit.in_flight {
            fit.in_flight = false;
            self.in_flight -= 1;
        }
        self.refits_total += 1;
        match d.result {
            Ok((f, p)) => {
                fit.model = Some(f.model);
                fit.periods = p;
                fit.made_at = d.made_at;
                fit.forecast = Some(Arc::new(f));
                fit.error = None;
            }
            Err(e) => fit.error = Some(e),
        }
    }

    /// The forecast of a series from the tick after `tick` on, for the rest of the
    /// last refit's horizon.
    fn after(&self, scope: Scope, metric: Metric, tick: u64) -> Option<(&Forecast, usize)> {
        let fit = self.fits.get(&(scope, metric))?;
        let f = fit.forecast.as_deref()?;
        let off = tick.saturating_sub(fit.made_at) as usize;
        (off < f.point.len()).then_some((f, off))
    }

    /// Upper bounds of a series from the tick after `tick` on; empty without one.
    pub fn upper_after(&self, scope: Scope, metric: Metric, tick: u64) -> &[f64] {
        self.after(scope, metric, tick)
            .map_or(&[], |(f, off)| &f.upper[off..])
    }

    /// The point forecast of a series for the tick after `tick`.
    pub fn next_point(&self, scope: Scope, metric: Metric, tick: u64) -> Option<f64> {
        self.after(scope, metric, tick).map(|(f, off)| f.point[off])
    }

    /// The upper bound of the sum of some series, per tick ahead: the sum of their
    /// upper bounds, over the steps all of those that have one cover. A sum of upper
    /// quantiles bounds the quantile of the sum from above, so this errs towards
    /// capacity. Empty until one of them has a forecast.
    pub fn sum_upper_after(&self, scopes: &[Scope], metric: Metric, tick: u64) -> Vec<f64> {
        let parts: Vec<&[f64]> = scopes
            .iter()
            .map(|s| self.upper_after(*s, metric, tick))
            .filter(|u| !u.is_empty())
            .collect();
        let len = parts.iter().map(|u| u.len()).min().unwrap_or(0);
        (0..len).map(|i| parts.iter().map(|u| u[i]).sum()).collect()
    }

    /// Every series: its model, and the shared forecast of its last refit.
    pub fn view(&self) -> Vec<SeriesView> {
        self.fits
            .iter()
            .map(|((scope, metric), fit)| {
                let samples = self
                    .forecaster
                    .history(*scope, *metric)
                    .map_or(0, |h| h.len());
                let (scope, id) = scope_parts(*scope);
                SeriesView {
                    scope,
                    id,
                    metric: metric_name(*metric),
                    samples,
                    model: fit.model,
                    periods: fit.periods.clone(),
                    made_at_tick: fit.made_at,
                    forecast: fit.forecast.clone(),
                    error: fit.error.clone(),
                }
            })
            .collect()
    }
}
