//! ARIMA(p, d, 0) fitted by ordinary least squares.
//!
//! Written by hand because no maintained Rust crate fits ARIMA models: augurs has
//! none, and the `arima` crate has had no release since 2021 and declares no licence.
//! Load series need little of ARIMA's generality: seasonality is taken out by MSTL
//! first (see [`ArimaTrend`]), which leaves short-memory autocorrelation around a
//! level that an autoregression captures well. So the model is kept to what can be
//! fitted exactly and fast on tens of thousands of points:
//!
//! - `d` is 0 or 1, chosen by a KPSS test at 5 % as R's `auto.arima` does. Its null
//!   is stationarity, so a level that wanders over months (a load series'
//!   seasonally adjusted part) is differenced, and a day-ahead forecast starts from
//!   the current level instead of reverting to a long-run mean. (A Dickey–Fuller
//!   test, whose null is a unit root, kept such series undifferenced: day-ahead
//!   MASE 1.06 instead of 0.86 on the Victorian electricity demand.)
//! - the AR order `p ≤ max_p` is chosen by AIC, every order fitted on the same sample;
//! - a constant is fitted when `d = 0`; with `d = 1` there is no drift, so a day-ahead
//!   forecast of a load series does not extrapolate a few hours' slope;
//! - prediction intervals come from the ψ-weights of the fitted process.

use std::borrow::Cow;

use augurs_core::{Forecast, ForecastIntervals};
use augurs_mstl::{FittedTrendModel, TrendModel};

/// 5 % critical value of the KPSS level-stationarity statistic (Kwiatkowski et al.
/// 1992, table 1).
const KPSS_CRITICAL_5PCT: f64 = 0.463;

/// Why an ARIMA fit failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArimaError {
    #[error("ARIMA needs at least {need} points, got {len}")]
    TooShort { len: usize, need: usize },
    #[error("the least-squares system is singular (a constant or degenerate series)")]
    Singular,
}

/// A fitted ARIMA(p, d, 0) model.
#[derive(Debug, Clone)]
pub struct FittedArima {
    d: usize,
    /// Constant (0 when `d = 1`).
    constant: f64,
    /// AR coefficients φ₁..φₚ of the (differenced) series.
    phi: Vec<f64>,
    /// Innovation variance.
    sigma2: f64,
    /// The training series, kept for forecasting and fitted values.
    y: Vec<f64>,
}

impl FittedArima {
    /// Fit to `y`, choosing `d` and `p ≤ max_p` from the data.
    pub fn fit(y: &[f64], max_p: usize) -> Result<FittedArima, ArimaError> {
        let need = 4 * max_p + 10;
        if y.len() < need {
            return Err(ArimaError::TooShort { len: y.len(), need });
        }
        let d = if kpss_statistic(y) < KPSS_CRITICAL_5PCT {
            0
        } else {
            1
        };
        let w = if d == 1 { differences(y) } else { y.to_vec() };
        let constant = d == 0;
        let start = max_p;
        let m = (w.len() - start) as f64;
        let mut best: Option<(f64, Vec<f64>, f64)> = None;
        for p in 0..=max_p {
            let (coef, rss) = ar_least_squares(&w, p, constant, start)?;
            let k = coef.len() as f64;
            let aic = m * (rss.max(f64::MIN_POSITIVE) / m).ln() + 2.0 * k;
            if best.as_ref().is_none_or(|(b, _, _)| aic < *b) {
                best = Some((aic, coef, rss / (m - k).max(1.0)));
            }
        }
        let (_, coef, sigma2) = best.ok_or(ArimaError::Singular)?;
        let (constant, phi) = if constant {
            (coef[0], coef[1..].to_vec())
        } else {
            (0.0, coef)
        };
        Ok(FittedArima {
            d,
            constant,
            phi,
            sigma2,
            y: y.to_vec(),
        })
    }

    /// The order of differencing chosen (0 or 1).
    pub fn d(&self) -> usize {
        self.d
    }

    /// The AR coefficients of the (differenced) series.
    pub fn phi(&self) -> &[f64] {
        &self.phi
    }

    /// Point forecasts for the next `horizon` steps and, given a level, their
    /// prediction intervals.
    pub fn predict(&self, horizon: usize, level: Option<f64>) -> Forecast {
        let mut w = if self.d == 1 {
            differences(&self.y)
        } else {
            self.y.clone()
        };
        let observed = w.len();
        for _ in 0..horizon {
            let next = self.constant
                + self
                    .phi
                    .iter()
                    .enumerate()
                    .map(|(i, phi)| phi * w[w.len() - 1 - i])
                    .sum::<f64>();
            w.push(next);
        }
        let mut point = w[observed..].to_vec();
        if self.d == 1 {
            let mut level = self.y[self.y.len() - 1];
            for p in &mut point {
                level += *p;
                *p = level;
            }
        }
        let intervals = level.map(|level| {
            let z = z_score(level);
            let mut lower = Vec::with_capacity(horizon);
            let mut upper = Vec::with_capacity(horizon);
            let mut var = 0.0;
            for (psi, p) in self.psi_weights(horizon).iter().zip(&point) {
                var += psi * psi * self.sigma2;
                lower.push(p - z * var.sqrt());
                upper.push(p + z * var.sqrt());
            }
            ForecastIntervals {
                level,
                lower,
                upper,
            }
        });
        Forecast { point, intervals }
    }

    /// One-step-ahead fitted values over the training series; the first points,
    /// which have no lags to fit from, are the observations themselves.
    pub fn fitted(&self) -> Vec<f64> {
        let lags = self.phi.len() + self.d;
        let w = if self.d == 1 {
            differences(&self.y)
        } else {
            self.y.clone()
        };
        (0..self.y.len())
            .map(|t| {
                if t < lags.max(1) {
                    return self.y[t];
                }
                // With d = 1, w[t - 1] = y[t] - y[t - 1].
                let wt = t - self.d;
                let ar = self.constant
                    + self
                        .phi
                        .iter()
                        .enumerate()
                        .map(|(i, phi)| phi * w[wt - 1 - i])
                        .sum::<f64>();
                if self.d == 1 { self.y[t - 1] + ar } else { ar }
            })
            .collect()
    }

    /// ψ-weights of the process in `y`: the AR polynomial times (1 − B)^d, inverted.
    fn psi_weights(&self, horizon: usize) -> Vec<f64> {
        let mut a = self.phi.clone();
        if self.d == 1 {
            // (1 − Σ φᵢ Bⁱ)(1 − B) = 1 − Σ aᵢ Bⁱ with a₁ = 1 + φ₁, aᵢ = φᵢ − φᵢ₋₁, a_{p+1} = −φₚ.
            a.push(0.0);
            for i in (1..a.len()).rev() {
                a[i] -= a[i - 1];
            }
            a[0] += 1.0;
        }
        let mut psi = vec![1.0];
        for j in 1..horizon {
            let v = (1..=j.min(a.len())).map(|i| a[i - 1] * psi[j - i]).sum();
            psi.push(v);
        }
        psi
    }
}

/// The two-sided normal quantile for a central interval at `level`.
pub(crate) fn z_score(level: f64) -> f64 {
    distrs::Normal::ppf(0.5 + level / 2.0, 0.0, 1.0)
}

fn differences(y: &[f64]) -> Vec<f64> {
    y.windows(2).map(|w| w[1] - w[0]).collect()
}

/// KPSS statistic for level stationarity: the partial sums of the deviations from
/// the mean, scaled by a Newey–West long-run variance with ⌊4 (n/100)^¼⌋ lags.
fn kpss_statistic(y: &[f64]) -> f64 {
    let n = y.len() as f64;
    let mean = y.iter().sum::<f64>() / n;
    let e: Vec<f64> = y.iter().map(|v| v - mean).collect();
    let lags = (4.0 * (n / 100.0).powf(0.25)) as usize;
    let mut long_run = e.iter().map(|v| v * v).sum::<f64>() / n;
    for k in 1..=lags.min(e.len() - 1) {
        let weight = 1.0 - k as f64 / (lags as f64 + 1.0);
        long_run += 2.0 * weight * e.iter().zip(&e[k..]).map(|(a, b)| a * b).sum::<f64>() / n;
    }
    if long_run <= 0.0 {
        return 0.0;
    }
    let mut partial = 0.0;
    let mut sum_sq = 0.0;
    for v in &e {
        partial += v;
        sum_sq += partial * partial;
    }
    sum_sq / (n * n * long_run)
}

/// Least squares of wₜ on (1,) wₜ₋₁..wₜ₋ₚ for t ≥ start: coefficients (constant
/// first when asked for) and the residual sum of squares.
fn ar_least_squares(
    w: &[f64],
    p: usize,
    constant: bool,
    start: usize,
) -> Result<(Vec<f64>, f64), ArimaError> {
    let offset = usize::from(constant);
    let k = p + offset;
    if k == 0 {
        return Ok((Vec::new(), w[start..].iter().map(|v| v * v).sum()));
    }
    let mut normal = NormalEquations::new(k);
    let mut row = vec![0.0; k];
    for t in start..w.len() {
        if constant {
            row[0] = 1.0;
        }
        for i in 0..p {
            row[offset + i] = w[t - 1 - i];
        }
        normal.add(&row, w[t]);
    }
    normal.solve()
}

/// XᵀX and Xᵀy accumulated row by row, solved by Cholesky.
struct NormalEquations {
    k: usize,
    xtx: Vec<f64>,
    xty: Vec<f64>,
    yty: f64,
}

impl NormalEquations {
    fn new(k: usize) -> Self {
        NormalEquations {
            k,
            xtx: vec![0.0; k * k],
            xty: vec![0.0; k],
            yty: 0.0,
        }
    }

    fn add(&mut self, x: &[f64], y: f64) {
        for i in 0..self.k {
            self.xty[i] += x[i] * y;
            for j in 0..=i {
                self.xtx[i * self.k + j] += x[i] * x[j];
            }
        }
        self.yty += y * y;
    }

    /// Lower-triangular L with LLᵀ = XᵀX.
    fn cholesky(&self) -> Result<Vec<f64>, ArimaError> {
        let k = self.k;
        let mut l = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..=i {
                let s: f64 = (0..j).map(|m| l[i * k + m] * l[j * k + m]).sum();
                let v = self.xtx[i * k + j] - s;
                if i == j {
                    // Relative pivot check: a pivot lost to rounding means collinear columns.
                    if v <= self.xtx[i * k + i].abs() * 1e-12 || v <= 0.0 {
                        return Err(ArimaError::Singular);
                    }
                    l[i * k + i] = v.sqrt();
                } else {
                    l[i * k + j] = v / l[j * k + j];
                }
            }
        }
        Ok(l)
    }

    fn solve_with(&self, l: &[f64], b: &[f64]) -> Vec<f64> {
        let k = self.k;
        let mut z = b.to_vec();
        for i in 0..k {
            for m in 0..i {
                z[i] -= l[i * k + m] * z[m];
            }
            z[i] /= l[i * k + i];
        }
        for i in (0..k).rev() {
            for m in i + 1..k {
                z[i] -= l[m * k + i] * z[m];
            }
            z[i] /= l[i * k + i];
        }
        z
    }

    /// Coefficients and residual sum of squares.
    fn solve(&self) -> Result<(Vec<f64>, f64), ArimaError> {
        let l = self.cholesky()?;
        let beta = self.solve_with(&l, &self.xty);
        let explained: f64 = beta.iter().zip(&self.xty).map(|(b, v)| b * v).sum();
        Ok((beta, (self.yty - explained).max(0.0)))
    }
}

/// ARIMA as the trend model of an MSTL decomposition: it forecasts the seasonally
/// adjusted series (trend plus remainder), whose short-term autocorrelation an
/// exponential-smoothing level misses.
#[derive(Debug, Clone, Copy)]
pub struct ArimaTrend {
    pub max_p: usize,
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl TrendModel for ArimaTrend {
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed("ARIMA")
    }

    fn fit(&self, y: &[f64]) -> Result<Box<dyn FittedTrendModel + Sync + Send>, BoxError> {
        Ok(Box::new(FittedArima::fit(y, self.max_p)?))
    }
}

impl FittedTrendModel for FittedArima {
    fn predict_inplace(
        &self,
        horizon: usize,
        level: Option<f64>,
        forecast: &mut Forecast,
    ) -> Result<(), BoxError> {
        *forecast = self.predict(horizon, level);
        Ok(())
    }

    fn predict_in_sample_inplace(
        &self,
        level: Option<f64>,
        forecast: &mut Forecast,
    ) -> Result<(), BoxError> {
        let point = self.fitted();
        forecast.intervals = level.map(|level| {
            let half = z_score(level) * self.sigma2.sqrt();
            ForecastIntervals {
                level,
                lower: point.iter().map(|p| p - half).collect(),
                upper: point.iter().map(|p| p + half).collect(),
            }
        });
        forecast.point = point;
        Ok(())
    }

    fn training_data_size(&self) -> Option<usize> {
        Some(self.y.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forecast::tests::Noise;

    fn ar1(phi: f64, c: f64, n: usize, seed: u64) -> Vec<f64> {
        let mut noise = Noise::new(seed);
        let mean = c / (1.0 - phi);
        let mut y = vec![mean];
        for _ in 1..n {
            let prev = y[y.len() - 1];
            y.push(c + phi * prev + noise.normal());
        }
        y
    }

    #[test]
    fn ar1_recovers_its_coefficient_and_mean() {
        let y = ar1(0.7, 3.0, 5000, 1);
        let m = FittedArima::fit(&y, 5).unwrap();
        assert_eq!(m.d(), 0);
        assert!((m.phi()[0] - 0.7).abs() < 0.04, "phi {:?}", m.phi());
        assert!(m.phi()[1..].iter().all(|p| p.abs() < 0.06), "{:?}", m.phi());
        assert!((m.sigma2 - 1.0).abs() < 0.08, "sigma2 {}", m.sigma2);
        // Far ahead the forecast reverts to the process mean c / (1 − φ) = 10.
        let f = m.predict(200, None);
        assert!((f.point[199] - 10.0).abs() < 0.3, "{}", f.point[199]);
    }

    #[test]
    fn random_walk_is_differenced_and_held_flat() {
        let mut noise = Noise::new(2);
        let mut y = vec![100.0];
        for _ in 1..3000 {
            let prev = y[y.len() - 1];
            y.push(prev + noise.normal());
        }
        let m = FittedArima::fit(&y, 4).unwrap();
        assert_eq!(m.d(), 1);
        let f = m.predict(10, Some(0.95));
        let last = y[y.len() - 1];
        assert!(
            f.point.iter().all(|p| (p - last).abs() < 0.5),
            "{:?}",
            f.point
        );
        // A random walk's h-step variance grows like h: the interval widens as √h.
        let iv = f.intervals.unwrap();
        let w1 = iv.upper[0] - iv.lower[0];
        let w9 = iv.upper[8] - iv.lower[8];
        assert!((w9 / w1 - 3.0).abs() < 0.3, "{w1} {w9}");
        assert!((w1 / (2.0 * 1.96) - 1.0).abs() < 0.1, "{w1}");
    }

    #[test]
    fn ar2_is_chosen_over_ar1_and_forecasts_its_recursion() {
        let mut noise = Noise::new(3);
        let mut y = vec![0.0, 0.0];
        for t in 2..4000 {
            y.push(0.5 * y[t - 1] - 0.3 * y[t - 2] + noise.normal());
        }
        let m = FittedArima::fit(&y, 6).unwrap();
        assert_eq!(m.d(), 0);
        assert!(m.phi().len() >= 2);
        assert!((m.phi()[0] - 0.5).abs() < 0.05 && (m.phi()[1] + 0.3).abs() < 0.05);
        let f = m.predict(2, None);
        let n = y.len();
        let one = m.constant
            + m.phi()
                .iter()
                .zip(y.iter().rev())
                .map(|(p, v)| p * v)
                .sum::<f64>();
        assert!((f.point[0] - one).abs() < 1e-9);
        // Fitted values are one-step predictions from the observed lags.
        let fitted = m.fitted();
        let expect = m.constant
            + m.phi()
                .iter()
                .enumerate()
                .map(|(i, p)| p * y[n - 2 - i])
                .sum::<f64>();
        assert!((fitted[n - 1] - expect).abs() < 1e-9);
    }

    #[test]
    fn constant_and_short_series_are_errors() {
        assert_eq!(
            FittedArima::fit(&[5.0; 100], 3).unwrap_err(),
            ArimaError::Singular
        );
        assert!(matches!(
            FittedArima::fit(&[1.0, 2.0, 3.0], 3),
            Err(ArimaError::TooShort { .. })
        ));
    }
}
