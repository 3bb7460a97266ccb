//! Load forecasting: the agent's forecast stage, sans-I/O.
//!
//! Pure functions over slices of samples taken at the control-loop interval, plus the
//! bounded per-series history the agent feeds one tick at a time ([`Forecaster`]).
//! No clocks and no I/O: time is the sample index.
//!
//! Models ([`Model`]):
//! - seasonal naive: repeat the last season; the baseline every other model must beat;
//! - ETS: augurs' AutoETS, non-seasonal (augurs has no seasonal ETS);
//! - MSTL: augurs' MSTL decomposition over every period, AutoETS on the seasonally
//!   adjusted series — the way seasonality reaches ETS;
//! - ARIMA: [`arima`], ARIMA(p, d, 0) by least squares; on a seasonal series it is
//!   fitted to the MSTL seasonally adjusted series (STL + ARIMA);
//! - combination: the mean of MSTL's and ARIMA's forecasts (ETS's and ARIMA's without
//!   a period). Averaging two models whose errors differ is the most reliable gain
//!   in forecasting competitions (M3, M4): its absolute error is never above the
//!   mean of its members' (triangle inequality), whichever member turns out better
//!   on the day, and usually well below the worse one's.
//!
//! [`select`] picks a model per series by a rolling-origin backtest on the series' own
//! history, scored by MASE; [`backtest`] reports MASE and sMAPE for every model.
//! Seasonal periods come from the caller or from [`detect_periods`].

pub mod arima;

use std::collections::{BTreeMap, VecDeque};

use augurs_core::{Fit, Predict};
use augurs_ets::AutoETS;
use augurs_mstl::{MSTLModel, TrendModel};
use nic_firmware::Class;
use serde::Serialize;

use arima::{ArimaTrend, FittedArima};

/// Longest seasonal period looked for: a week at 5-minute ticks.
pub const MAX_PERIOD: usize = 2016;

/// Highest AR order ARIMA considers. Seasonality is removed before ARIMA sees a
/// seasonal series, so only short memory is left to model.
const ARIMA_MAX_P: usize = 8;

/// Rolling origins used to choose a model: enough to score at least
/// `SELECTION_POINTS` forecasts and two cycles of the longest period (a day-ahead
/// choice on a weekly series sees every weekday twice), within these bounds. One
/// origin's luck decides too much; many origins cost a fit each.
const SELECTION_FOLDS: (usize, usize) = (3, 14);
const SELECTION_POINTS: usize = 30;

/// How much lower a single model's backtest MASE must be for it to be chosen over
/// the combination. A few days of backtest rank close models by luck, and the
/// combination is the one least hurt when the next day differs from the last few
/// (on the development series' holiday weeks, picking the backtest's winner
/// outright lost to the combination on four series of five).
const SINGLE_MODEL_MARGIN: f64 = 0.1;

/// A forecasting model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Model {
    SeasonalNaive,
    Ets,
    Mstl,
    Arima,
    Combination,
}

impl Model {
    pub const ALL: [Model; 5] = [
        Model::SeasonalNaive,
        Model::Ets,
        Model::Mstl,
        Model::Arima,
        Model::Combination,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Model::SeasonalNaive => "seasonal_naive",
            Model::Ets => "ets",
            Model::Mstl => "mstl",
            Model::Arima => "arima",
            Model::Combination => "combination",
        }
    }

    /// Whether the model can run with these (usable) periods: MSTL needs one.
    fn applies(self, periods: &[usize]) -> bool {
        self != Model::Mstl || !periods.is_empty()
    }
}

impl std::fmt::Display for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Point forecasts and prediction intervals for the next `point.len()` ticks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Forecast {
    pub model: Model,
    pub point: Vec<f64>,
    pub lower: Vec<f64>,
    pub upper: Vec<f64>,
}

/// Why a forecast could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForecastError {
    #[error("the series has {len} points; {model} needs at least {need}")]
    TooShort {
        model: &'static str,
        len: usize,
        need: usize,
    },
    #[error("value {index} of the series is not a finite number")]
    NotFinite { index: usize },
    #[error("the level must lie strictly between 0 and 1, got {0}")]
    Level(f64),
    #[error("the horizon must be at least 1")]
    Horizon,
    #[error("a seasonal period must be at least 2, got {0}")]
    Period(usize),
    #[error("{model} needs a seasonal period, and the series has none")]
    NoSeason { model: Model },
    #[error("{model} failed: {reason}")]
    Fit { model: Model, reason: String },
}

impl ForecastError {
    /// Whether the caller's input is at fault (as opposed to a model failing on it).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, ForecastError::Fit { .. })
    }
}

fn check_inputs(y: &[f64], horizon: usize, level: f64) -> Result<(), ForecastError> {
    if horizon == 0 {
        return Err(ForecastError::Horizon);
    }
    if !(level > 0.0 && level < 1.0) {
        return Err(ForecastError::Level(level));
    }
    match y.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(ForecastError::NotFinite { index }),
        None => Ok(()),
    }
}

fn check_periods(periods: &[usize]) -> Result<(), ForecastError> {
    match periods.iter().find(|&&p| p < 2) {
        Some(&p) => Err(ForecastError::Period(p)),
        None => Ok(()),
    }
}

/// The periods a series of `n` points can carry: MSTL needs two full cycles of each.
/// Sorted, deduplicated.
pub fn usable_periods(periods: &[usize], n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = periods
        .iter()
        .copied()
        .filter(|&p| p >= 2 && 2 * p < n)
        .collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// Forecast `horizon` ticks past the end of `y` with one model.
///
/// `periods` are the seasonal periods in ticks; those the series is too short for
/// (fewer than two cycles) are ignored. A series with no negative value is a rate
/// or a count, so its forecasts and intervals are floored at 0: an additive model's
/// night-time trough would otherwise dip below zero.
pub fn forecast(
    model: Model,
    y: &[f64],
    periods: &[usize],
    horizon: usize,
    level: f64,
) -> Result<Forecast, ForecastError> {
    check_inputs(y, horizon, level)?;
    check_periods(periods)?;
    let periods = usable_periods(periods, y.len());
    let fit_err = |reason: String| ForecastError::Fit { model, reason };
    let out = match model {
        Model::SeasonalNaive => seasonal_naive(y, &periods, horizon, level)?,
        Model::Ets => {
            need(model, y.len(), 10)?;
            let fitted = AutoETS::non_seasonal()
                .fit(y)
                .map_err(|e| fit_err(e.to_string()))?;
            fitted
                .predict(horizon, level)
                .map_err(|e| fit_err(e.to_string()))?
        }
        Model::Mstl => {
            if periods.is_empty() {
                return Err(ForecastError::NoSeason { model });
            }
            mstl(
                y,
                &periods,
                AutoETS::non_seasonal().into_trend_model(),
                horizon,
                level,
            )
            .map_err(fit_err)?
        }
        Model::Arima => {
            if periods.is_empty() {
                FittedArima::fit(y, ARIMA_MAX_P)
                    .map_err(|e| match e {
                        arima::ArimaError::TooShort { len, need } => ForecastError::TooShort {
                            model: "arima",
                            len,
                            need,
                        },
                        other => fit_err(other.to_string()),
                    })?
                    .predict(horizon, Some(level))
            } else {
                let trend = ArimaTrend { max_p: ARIMA_MAX_P };
                mstl(y, &periods, trend, horizon, level).map_err(fit_err)?
            }
        }
        Model::Combination => {
            let smooth = if periods.is_empty() {
                Model::Ets
            } else {
                Model::Mstl
            };
            let a = forecast(smooth, y, &periods, horizon, level)?;
            let b = forecast(Model::Arima, y, &periods, horizon, level)?;
            let mean = |x: &[f64], z: &[f64]| -> Vec<f64> {
                x.iter().zip(z).map(|(x, z)| (x + z) / 2.0).collect()
            };
            augurs_core::Forecast {
                point: mean(&a.point, &b.point),
                intervals: Some(augurs_core::ForecastIntervals {
                    level,
                    lower: mean(&a.lower, &b.lower),
                    upper: mean(&a.upper, &b.upper),
                }),
            }
        }
    };
    let (mut point, mut lower, mut upper) = match out.intervals {
        Some(iv) => (out.point, iv.lower, iv.upper),
        None => return Err(fit_err("no prediction intervals".into())),
    };
    if point.len() != horizon || point.iter().any(|v| !v.is_finite()) {
        return Err(fit_err("the forecast is not finite".into()));
    }
    if y.iter().all(|v| *v >= 0.0) {
        for v in point.iter_mut().chain(&mut lower).chain(&mut upper) {
            *v = v.max(0.0);
        }
    }
    Ok(Forecast {
        model,
        point,
        lower,
        upper,
    })
}

fn need(model: Model, len: usize, need: usize) -> Result<(), ForecastError> {
    if len < need {
        return Err(ForecastError::TooShort {
            model: model.name(),
            len,
            need,
        });
    }
    Ok(())
}

fn mstl<T: TrendModel>(
    y: &[f64],
    periods: &[usize],
    trend: T,
    horizon: usize,
    level: f64,
) -> Result<augurs_core::Forecast, String> {
    let fitted = MSTLModel::new(periods.to_vec(), trend)
        .fit(y)
        .map_err(|e| e.to_string())?;
    fitted.predict(horizon, level).map_err(|e| e.to_string())
}

/// Mean absolute `m`-step seasonal difference: the seasonal naive in-sample error,
/// MASE's scale.
fn seasonal_mae(y: &[f64], m: usize) -> f64 {
    let n = y.len().saturating_sub(m);
    if n == 0 {
        return f64::NAN;
    }
    y.iter()
        .skip(m)
        .zip(y)
        .map(|(a, b)| (a - b).abs())
        .sum::<f64>()
        / n as f64
}

/// Seasonal naive with the period whose seasonal difference is smallest in sample
/// (weekly beats daily on series with a weekly pattern); plain naive without periods.
/// Intervals: the h-step error of repeating a season k times has k times the
/// variance of the one-season difference.
fn seasonal_naive(
    y: &[f64],
    periods: &[usize],
    horizon: usize,
    level: f64,
) -> Result<augurs_core::Forecast, ForecastError> {
    let m = periods
        .iter()
        .copied()
        .min_by(|a, b| seasonal_mae(y, *a).total_cmp(&seasonal_mae(y, *b)))
        .unwrap_or(1);
    need(Model::SeasonalNaive, y.len(), m + 2)?;
    let n = y.len();
    let diffs = n - m;
    let sigma = (y
        .iter()
        .skip(m)
        .zip(y)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        / diffs as f64)
        .sqrt();
    let z = arima::z_score(level);
    let mut out = augurs_core::Forecast::with_capacity_and_level(horizon, level);
    let iv = out.intervals.as_mut().expect("created with a level");
    for h in 0..horizon {
        let p = y[n - m + h % m];
        let half = z * sigma * ((h / m + 1) as f64).sqrt();
        out.point.push(p);
        iv.lower.push(p - half);
        iv.upper.push(p + half);
    }
    Ok(out)
}

/// Seasonal periods of `y` from its autocorrelation, shortest first (at most 3).
///
/// Written by hand rather than taken from augurs-seasons: its Welch periodogram
/// reads periods off a power-of-two FFT grid, which cannot land on 336 (a week of
/// half hours) or 168 exactly, and MSTL needs the exact period.
///
/// The series is detrended by a least-squares line; a lag is a candidate when its
/// autocorrelation is at least 0.2, the highest within ±10 % of the lag, and 0.1
/// above the lowest point between half the lag and the lag. The strongest candidate
/// and the shorter ones that divide it are kept, shortest first; a multiple of an
/// already kept period (longer than the strongest too) only when it stands 0.05
/// above its neighbouring multiples — a weekly cycle over a daily one, not the daily
/// cycle's echo.
pub fn detect_periods(y: &[f64]) -> Vec<usize> {
    let n = y.len();
    let max_lag = (n / 3).min(MAX_PERIOD + MAX_PERIOD / 10);
    if max_lag < 4 {
        return Vec::new();
    }
    let r = autocorrelation(&detrend(y), max_lag);
    let peak = |k: usize| -> bool {
        let w = (k / 10).max(1);
        if k + w > max_lag || r[k] < 0.2 {
            return false;
        }
        let window_max = r[k - w..=k + w].iter().copied().fold(f64::MIN, f64::max);
        let trough = r[k / 2..k].iter().copied().fold(f64::MAX, f64::min);
        r[k] >= window_max && r[k] - trough >= 0.1
    };
    let candidates: Vec<usize> = (2..=max_lag.min(MAX_PERIOD)).filter(|&k| peak(k)).collect();
    let Some(&strongest) = candidates.iter().max_by(|a, b| r[**a].total_cmp(&r[**b])) else {
        return Vec::new();
    };
    let divides = |q: usize, p: usize| -> Option<usize> {
        let k = ((p as f64) / (q as f64)).round() as usize;
        let tol = (p / 50).max(1);
        (k >= 1 && (k * q).abs_diff(p) <= tol).then_some(k * q)
    };
    let mut kept: Vec<usize> = Vec::new();
    for &c in &candidates {
        if c < strongest && divides(c, strongest).is_none() {
            continue;
        }
        let base = kept
            .iter()
            .rev()
            .find_map(|&q| divides(q, c).map(|m| (q, m)));
        let keep = match base {
            None => c <= strongest,
            Some((q, m)) if m == q => false,
            // Both neighbouring multiples must be in range to judge a stand-out.
            Some((q, m)) => m + q <= max_lag && r[m] >= r[m - q].max(r[m + q]) + 0.05,
        };
        let c = base.map_or(c, |(_, m)| m);
        if keep && !kept.contains(&c) {
            kept.push(c);
        }
    }
    kept.truncate(3);
    kept
}

fn detrend(y: &[f64]) -> Vec<f64> {
    let n = y.len() as f64;
    let tm = (n - 1.0) / 2.0;
    let ym = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (t, v) in y.iter().enumerate() {
        let dt = t as f64 - tm;
        sxy += dt * (v - ym);
        sxx += dt * dt;
    }
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    y.iter()
        .enumerate()
        .map(|(t, v)| v - ym - slope * (t as f64 - tm))
        .collect()
}

/// r[k] for k in 0..=max_lag of a zero-mean series, each lag's sum averaged over its
/// own n − k terms: the usual biased estimate shrinks long lags by (n − k)/n, which
/// would let a daily peak outrank an exact weekly repeat.
fn autocorrelation(x: &[f64], max_lag: usize) -> Vec<f64> {
    let n = x.len() as f64;
    let var = x.iter().map(|v| v * v).sum::<f64>() / n;
    if var == 0.0 {
        return vec![0.0; max_lag + 1];
    }
    (0..=max_lag)
        .map(|k| {
            let cov = x.iter().zip(&x[k..]).map(|(a, b)| a * b).sum::<f64>();
            cov / (n - k as f64) / var
        })
        .collect()
}

/// A model's accuracy over a backtest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub model: Model,
    /// Mean absolute error over the MAE of the in-sample seasonal difference at the
    /// shortest period (lag 1 without one), of the training part before the window.
    pub mase: f64,
    /// Symmetric MAPE in percent: mean of 200·|y − ŷ| / (|y| + |ŷ|).
    pub smape: f64,
}

/// One model's backtest outcome: its score, or why it could not be scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub model: Model,
    pub result: Result<Score, ForecastError>,
}

/// Rolling-origin backtest over the last `points` values of `y`: from origins
/// `n − points`, `n − points + horizon`, …, each model is fitted on everything
/// before the origin and forecasts up to `horizon` ticks.
pub fn backtest(
    y: &[f64],
    periods: &[usize],
    horizon: usize,
    points: usize,
    models: &[Model],
) -> Result<Vec<Trial>, ForecastError> {
    check_inputs(y, horizon, 0.5)?;
    check_periods(periods)?;
    let n = y.len();
    let train = n.saturating_sub(points);
    let longest = periods.iter().copied().max().unwrap_or(0);
    let min_train = (2 * longest + 1).max(20);
    if points == 0 || train < min_train {
        return Err(ForecastError::TooShort {
            model: "a backtest",
            len: n,
            need: points.max(1) + min_train,
        });
    }
    let shortest = usable_periods(periods, train).first().copied().unwrap_or(1);
    let scale = seasonal_mae(&y[..train], shortest);
    // Point forecasts per (model, origin), so the combination reuses its members'.
    let mut memo = BTreeMap::new();
    let trials = models
        .iter()
        .map(|&model| {
            let result = (|| {
                let (mut abs, mut smape, mut count) = (0.0, 0.0, 0usize);
                for origin in (train..n).step_by(horizon) {
                    let h = horizon.min(n - origin);
                    let point = backtest_point(&mut memo, model, &y[..origin], periods, h)?;
                    for (actual, predicted) in y[origin..origin + h].iter().zip(&point) {
                        let e = (actual - predicted).abs();
                        abs += e;
                        let denom = actual.abs() + predicted.abs();
                        smape += if denom > 0.0 { 200.0 * e / denom } else { 0.0 };
                        count += 1;
                    }
                }
                Ok(Score {
                    model,
                    mase: abs / count as f64 / scale,
                    smape: smape / count as f64,
                })
            })();
            Trial { model, result }
        })
        .collect();
    Ok(trials)
}

type PointMemo = BTreeMap<(Model, usize), Result<Vec<f64>, ForecastError>>;

/// `model`'s point forecast from the end of `train`, fitted once per origin.
fn backtest_point(
    memo: &mut PointMemo,
    model: Model,
    train: &[f64],
    periods: &[usize],
    horizon: usize,
) -> Result<Vec<f64>, ForecastError> {
    if let Some(done) = memo.get(&(model, train.len())) {
        return done.clone();
    }
    let result = if model == Model::Combination {
        let smooth = if usable_periods(periods, train.len()).is_empty() {
            Model::Ets
        } else {
            Model::Mstl
        };
        backtest_point(memo, smooth, train, periods, horizon).and_then(|a| {
            let b = backtest_point(memo, Model::Arima, train, periods, horizon)?;
            Ok(a.iter().zip(&b).map(|(a, b)| (a + b) / 2.0).collect())
        })
    } else {
        forecast(model, train, periods, horizon, 0.95).map(|f| f.point)
    };
    memo.insert((model, train.len()), result.clone());
    result
}

/// A forecast with the backtest that chose its model.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub forecast: Forecast,
    /// The seasonal periods used.
    pub periods: Vec<usize>,
    /// The candidates' scores; empty when the series was too short to backtest and
    /// the combination (or, failing that, seasonal naive) was used.
    pub trials: Vec<Trial>,
}

/// Choose a model for `y` by a rolling-origin backtest over its last few horizons
/// (see `SELECTION_FOLDS`; fewer on a short series), then forecast from the whole
/// series. The lowest MASE wins, except that the combination stays unless a single
/// model beats it by `SINGLE_MODEL_MARGIN`. Without `periods`, they are detected.
pub fn select(
    y: &[f64],
    periods: Option<&[usize]>,
    horizon: usize,
    level: f64,
) -> Result<Selection, ForecastError> {
    check_inputs(y, horizon, level)?;
    let periods = match periods {
        Some(p) => {
            check_periods(p)?;
            usable_periods(p, y.len())
        }
        None => detect_periods(y),
    };
    let candidates: Vec<Model> = Model::ALL
        .into_iter()
        .filter(|m| m.applies(&periods))
        .collect();
    let mut trials = Vec::new();
    let longest = periods.last().copied().unwrap_or(0);
    let folds = SELECTION_POINTS
        .max(2 * longest)
        .div_ceil(horizon)
        .clamp(SELECTION_FOLDS.0, SELECTION_FOLDS.1);
    for folds in (1..=folds).rev() {
        if let Ok(t) = backtest(y, &periods, horizon, folds * horizon, &candidates) {
            trials = t;
            break;
        }
    }
    let scored: Vec<&Score> = trials
        .iter()
        .filter_map(|t| t.result.as_ref().ok())
        .filter(|s| s.mase.is_finite())
        .collect();
    let best = scored.iter().min_by(|a, b| a.mase.total_cmp(&b.mase));
    let combination = scored.iter().find(|s| s.model == Model::Combination);
    let chosen = match (best, combination) {
        (Some(b), Some(c)) if b.mase > c.mase * (1.0 - SINGLE_MODEL_MARGIN) => Some(c.model),
        (b, _) => b.map(|s| s.model),
    };
    let forecast = match chosen {
        Some(model) => forecast(model, y, &periods, horizon, level)?,
        None => forecast(Model::Combination, y, &periods, horizon, level)
            .or_else(|_| forecast(Model::SeasonalNaive, y, &periods, horizon, level))?,
    };
    Ok(Selection {
        forecast,
        periods,
        trials,
    })
}

/// The last `capacity` samples of one series, oldest first.
#[derive(Debug, Clone)]
pub struct History {
    capacity: usize,
    samples: VecDeque<f64>,
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            capacity: capacity.max(1),
            samples: VecDeque::with_capacity(capacity.max(1)),
        }
    }

    /// Append one tick's sample, dropping the oldest when full.
    pub fn push(&mut self, value: f64) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(value);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Sample `i`, oldest first.
    pub fn get(&self, i: usize) -> Option<f64> {
        self.samples.get(i).copied()
    }

    /// The samples, oldest first.
    pub fn to_vec(&self) -> Vec<f64> {
        self.samples.iter().copied().collect()
    }
}

/// What a series is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Class(Class),
    Node(u16),
    Shard(u16),
}

/// What a series counts, per second over a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    Packets,
    Bytes,
    NewFlows,
}

/// The agent's forecast stage: one bounded [`History`] per (scope, metric), fed one
/// sample per control-loop tick, forecast on demand with a model chosen per series.
#[derive(Debug, Clone)]
pub struct Forecaster {
    capacity: usize,
    periods: Option<Vec<usize>>,
    series: BTreeMap<(Scope, Metric), History>,
}

impl Forecaster {
    /// `capacity` ticks of history per series; `periods` in ticks, or `None` to
    /// detect each series' own.
    pub fn new(capacity: usize, periods: Option<Vec<usize>>) -> Forecaster {
        Forecaster {
            capacity,
            periods,
            series: BTreeMap::new(),
        }
    }

    /// Record one tick's rate for a series.
    pub fn observe(&mut self, scope: Scope, metric: Metric, value: f64) {
        self.series
            .entry((scope, metric))
            .or_insert_with(|| History::new(self.capacity))
            .push(value);
    }

    pub fn history(&self, scope: Scope, metric: Metric) -> Option<&History> {
        self.series.get(&(scope, metric))
    }

    /// Forecast a series `horizon` ticks ahead; `None` for a series never observed.
    pub fn forecast(
        &self,
        scope: Scope,
        metric: Metric,
        horizon: usize,
        level: f64,
    ) -> Option<Result<Selection, ForecastError>> {
        let history = self.series.get(&(scope, metric))?;
        Some(select(
            &history.to_vec(),
            self.periods.as_deref(),
            horizon,
            level,
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Seeded Gaussian noise (xorshift64* and Box–Muller), so tests are reproducible
    /// without a random-number dependency.
    pub(crate) struct Noise(u64);

    impl Noise {
        pub(crate) fn new(seed: u64) -> Noise {
            Noise(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
            ((v >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        pub(crate) fn normal(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    /// A daily shape of period `p` plus a weekly one of period `7p`, around `level`.
    fn daily_weekly(n: usize, p: usize, level: f64, noise_sd: f64, seed: u64) -> Vec<f64> {
        let mut noise = Noise::new(seed);
        (0..n)
            .map(|t| {
                let day = (2.0 * std::f64::consts::PI * (t % p) as f64 / p as f64).sin();
                let week = if (t / p) % 7 >= 5 { -0.6 } else { 0.2 };
                level + 10.0 * day + 10.0 * week + noise_sd * noise.normal()
            })
            .collect()
    }

    fn mae(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64
    }

    #[test]
    fn history_is_bounded_and_ordered() {
        let mut h = History::new(3);
        for v in 1..=5 {
            h.push(v as f64);
        }
        assert_eq!(h.to_vec(), vec![3.0, 4.0, 5.0]);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn pure_seasonal_series_is_forecast_exactly_by_seasonal_naive_and_mstl() {
        let y = daily_weekly(24 * 7 * 6, 24, 100.0, 0.0, 0);
        let future = daily_weekly(24 * 7 * 7, 24, 100.0, 0.0, 0)[y.len()..].to_vec();
        let sn = forecast(Model::SeasonalNaive, &y, &[24, 168], 48, 0.95).unwrap();
        assert_eq!(sn.point, future[..48]);
        let m = forecast(Model::Mstl, &y, &[24, 168], 48, 0.95).unwrap();
        assert!(mae(&m.point, &future[..48]) < 0.5, "{:?}", m.point);
        for f in [&sn, &m] {
            assert!(f.lower.iter().zip(&f.point).all(|(l, p)| l <= p));
            assert!(f.upper.iter().zip(&f.point).all(|(u, p)| u >= p));
        }
    }

    #[test]
    fn combination_is_the_mean_of_its_members() {
        let y = daily_weekly(24 * 7 * 5, 24, 100.0, 2.0, 13);
        let c = forecast(Model::Combination, &y, &[24, 168], 30, 0.9).unwrap();
        let m = forecast(Model::Mstl, &y, &[24, 168], 30, 0.9).unwrap();
        let a = forecast(Model::Arima, &y, &[24, 168], 30, 0.9).unwrap();
        for i in 0..30 {
            assert!((c.point[i] - (m.point[i] + a.point[i]) / 2.0).abs() < 1e-9);
            assert!((c.upper[i] - (m.upper[i] + a.upper[i]) / 2.0).abs() < 1e-9);
        }
        // The backtest reuses the members' forecasts and scores it the same.
        let direct: Vec<f64> = (0..2)
            .flat_map(|k| {
                let origin = y.len() - 48 + 24 * k;
                let f = forecast(Model::Combination, &y[..origin], &[24, 168], 24, 0.9).unwrap();
                f.point
                    .into_iter()
                    .zip(&y[origin..origin + 24])
                    .map(|(p, a)| (p - a).abs())
            })
            .collect();
        let trials = backtest(&y, &[24, 168], 24, 48, &[Model::Combination]).unwrap();
        let score = trials[0].result.clone().unwrap();
        let scale = seasonal_mae(&y[..y.len() - 48], 24);
        let mase = direct.iter().sum::<f64>() / 48.0 / scale;
        assert!((score.mase - mase).abs() < 1e-9, "{} vs {mase}", score.mase);
        let e = forecast(Model::Ets, &y, &[], 5, 0.9).unwrap();
        let a = forecast(Model::Arima, &y, &[], 5, 0.9).unwrap();
        let c = forecast(Model::Combination, &y, &[], 5, 0.9).unwrap();
        assert!((c.lower[4] - (e.lower[4] + a.lower[4]) / 2.0).abs() < 1e-9);
    }

    #[test]
    fn rates_are_never_forecast_below_zero() {
        let mut noise = Noise::new(12);
        let y: Vec<f64> = (0..24 * 21)
            .map(|t| {
                let day = (2.0 * std::f64::consts::PI * (t % 24) as f64 / 24.0).sin();
                (20.0 * day).max(0.0) + noise.normal().abs()
            })
            .collect();
        for model in Model::ALL {
            let f = forecast(model, &y, &[24], 48, 0.95).unwrap();
            assert!(f.lower.iter().all(|v| *v >= 0.0), "{model}: {:?}", f.lower);
            assert!(f.point.iter().all(|v| *v >= 0.0), "{model}");
        }
        // A series that can go negative keeps its negative forecasts.
        let shifted: Vec<f64> = y.iter().map(|v| v - 5.0).collect();
        let f = forecast(Model::Mstl, &shifted, &[24], 48, 0.95).unwrap();
        assert!(f.lower.iter().any(|v| *v < 0.0));
    }

    #[test]
    fn linear_trend_is_extrapolated_by_ets() {
        let mut noise = Noise::new(4);
        let y: Vec<f64> = (0..300)
            .map(|t| 50.0 + 2.0 * t as f64 + 0.5 * noise.normal())
            .collect();
        let f = forecast(Model::Ets, &y, &[], 20, 0.95).unwrap();
        for (h, p) in f.point.iter().enumerate() {
            let truth = 50.0 + 2.0 * (300 + h) as f64;
            assert!((p - truth).abs() < 3.0, "step {h}: {p} vs {truth}");
        }
        // The naive forecast stays flat and misses by up to 40.
        let naive = forecast(Model::SeasonalNaive, &y, &[], 20, 0.95).unwrap();
        assert!((naive.point[19] - naive.point[0]).abs() < 1e-9);
    }

    #[test]
    fn periods_are_detected_on_daily_and_weekly_cycles() {
        assert_eq!(
            detect_periods(&daily_weekly(48 * 7 * 8, 48, 500.0, 1.0, 5)),
            vec![48, 336]
        );
        let mut noise = Noise::new(6);
        let daily_only: Vec<f64> = (0..24 * 60)
            .map(|t| {
                let day = (2.0 * std::f64::consts::PI * (t % 24) as f64 / 24.0).sin();
                5.0 * day + 0.01 * t as f64 + noise.normal()
            })
            .collect();
        assert_eq!(detect_periods(&daily_only), vec![24]);
        let mut noise = Noise::new(7);
        let white: Vec<f64> = (0..2000).map(|_| noise.normal()).collect();
        assert_eq!(detect_periods(&white), Vec::<usize>::new());
    }

    /// 95 % intervals on 1-step forecasts of simulated noise cover about 95 %.
    #[test]
    fn interval_coverage_is_close_to_the_level() {
        let mut noise = Noise::new(8);
        for model in [Model::Ets, Model::Arima, Model::SeasonalNaive] {
            let mut inside = 0;
            let runs = 300;
            for _ in 0..runs {
                let y: Vec<f64> = (0..151).map(|_| 20.0 + noise.normal()).collect();
                let f = forecast(model, &y[..150], &[], 1, 0.95).unwrap();
                if f.lower[0] <= y[150] && y[150] <= f.upper[0] {
                    inside += 1;
                }
            }
            let coverage = inside as f64 / runs as f64;
            assert!(
                (0.91..=0.99).contains(&coverage),
                "{model}: coverage {coverage}"
            );
        }
    }

    #[test]
    fn selection_picks_the_model_the_series_was_built_for() {
        // Exact repetition: seasonal naive is perfect.
        let y = daily_weekly(24 * 7 * 6, 24, 100.0, 0.0, 0);
        let s = select(&y, None, 24, 0.95).unwrap();
        assert_eq!(s.periods, vec![24, 168]);
        assert_eq!(s.forecast.model, Model::SeasonalNaive);
        // A linear trend: ETS (MSTL is out: there is no season).
        let mut noise = Noise::new(9);
        let y: Vec<f64> = (0..400)
            .map(|t| 10.0 + 0.5 * t as f64 + 0.2 * noise.normal())
            .collect();
        let s = select(&y, None, 10, 0.95).unwrap();
        assert!(s.periods.is_empty());
        assert_eq!(s.forecast.model, Model::Ets);
        // An oscillating AR(2), which no smoothing level can follow: ARIMA.
        let mut y = vec![0.0, 0.0];
        for t in 2..1500 {
            y.push(0.3 * y[t - 1] - 0.8 * y[t - 2] + noise.normal());
        }
        let s = select(&y, Some(&[]), 2, 0.95).unwrap();
        assert_eq!(s.forecast.model, Model::Arima, "{:?}", s.trials);
    }

    #[test]
    fn backtest_scores_every_model_and_reports_failures() {
        let y = daily_weekly(24 * 7 * 6, 24, 100.0, 1.0, 10);
        let trials = backtest(&y, &[24, 168], 24, 72, &Model::ALL).unwrap();
        assert_eq!(trials.len(), 5);
        let score = |m: Model| {
            trials
                .iter()
                .find(|t| t.model == m)
                .unwrap()
                .result
                .clone()
                .unwrap()
        };
        // Noise of sd 1 against a seasonal difference of sd √2: MASE near 1/√2·… < 1.
        assert!(score(Model::Mstl).mase < 1.0);
        assert!(score(Model::Ets).mase > score(Model::Mstl).mase);
        assert!(score(Model::SeasonalNaive).smape < 2.0);
        // Without periods MSTL cannot run, and says so.
        let trials = backtest(&y, &[], 24, 72, &[Model::Mstl]).unwrap();
        assert_eq!(
            trials[0].result,
            Err(ForecastError::NoSeason { model: Model::Mstl })
        );
        assert_eq!(
            backtest(&y, &[0], 24, 72, &Model::ALL),
            Err(ForecastError::Period(0))
        );
        assert!(matches!(
            backtest(&y[..100], &[24, 168], 24, 72, &Model::ALL),
            Err(ForecastError::TooShort { .. })
        ));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let y = vec![1.0; 50];
        assert_eq!(
            forecast(Model::Ets, &y, &[], 0, 0.95),
            Err(ForecastError::Horizon)
        );
        assert_eq!(
            forecast(Model::Ets, &y, &[], 5, 1.0),
            Err(ForecastError::Level(1.0))
        );
        assert_eq!(
            forecast(Model::Ets, &[1.0, f64::NAN, 2.0], &[], 1, 0.9),
            Err(ForecastError::NotFinite { index: 1 })
        );
        assert_eq!(
            forecast(Model::Mstl, &y, &[1], 5, 0.9),
            Err(ForecastError::Period(1))
        );
        assert!(matches!(
            forecast(Model::SeasonalNaive, &[1.0], &[], 5, 0.9),
            Err(ForecastError::TooShort { .. })
        ));
    }

    #[test]
    fn forecaster_keeps_one_bounded_history_per_series() {
        let mut f = Forecaster::new(500, None);
        let node = Scope::Node(1);
        for (t, v) in daily_weekly(600, 24, 50.0, 0.5, 11).into_iter().enumerate() {
            f.observe(node, Metric::Packets, v);
            f.observe(Scope::Class(Class::Video), Metric::Bytes, t as f64);
        }
        assert_eq!(f.history(node, Metric::Packets).unwrap().len(), 500);
        assert!(f.forecast(node, Metric::NewFlows, 4, 0.9).is_none());
        let s = f.forecast(node, Metric::Packets, 24, 0.9).unwrap().unwrap();
        assert_eq!(s.periods, vec![24]);
        assert_eq!(s.forecast.point.len(), 24);
    }
}
