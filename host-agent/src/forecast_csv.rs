//! `flowshard forecast`: a load series read from a CSV file, forecast or backtested
//! with the agent's own forecaster ([`crate::forecast`]).
//!
//! The CSV has a header row. The first column is the time axis: a timestamp
//! (`YYYY-MM-DD`, optionally followed by `T` or a space and `HH:MM[:SS[.fff]]`, and by
//! `Z` or an offset `±HH:MM`) or a numeric index. The models assume one value per
//! step, so the time axis must advance by the same step on every row: a missing,
//! duplicate or out-of-order row is an error naming its line, never filled in
//! silently. Timestamps without an offset are read as they are written, so a local
//! clock's daylight-saving jump shows up as an irregular step. Every value must be
//! a finite number; an empty cell is a gap and an error too.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::Error;
use crate::forecast::{self, ForecastError, Model};

/// A CSV the forecaster cannot take, with the line at fault (1 is the header).
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {message}", path.display())]
pub struct CsvError {
    pub path: PathBuf,
    pub line: u64,
    pub message: String,
}

/// What `flowshard forecast` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub csv: PathBuf,
    pub value_column: Option<String>,
    /// Seasonal periods in rows; empty to detect them.
    pub periods: Vec<usize>,
    pub horizon: usize,
    pub level: f64,
    pub json: bool,
    /// Backtest over this many final points instead of forecasting.
    pub backtest: Option<usize>,
}

/// Run `flowshard forecast`.
pub fn run(opts: &Options) -> Result<(), Error> {
    let file = std::fs::File::open(&opts.csv).map_err(|source| Error::Io {
        what: format!("opening {}", opts.csv.display()),
        source,
    })?;
    let (column, y) = read_series(&opts.csv, file, opts.value_column.as_deref())?;
    let in_file = |source: ForecastError| Error::Forecast {
        path: opts.csv.clone(),
        source,
    };
    match opts.backtest {
        Some(points) => {
            // Periods are detected on the training part only, so the backtest never
            // sees the points it is scored on.
            let periods = if opts.periods.is_empty() {
                forecast::detect_periods(&y[..y.len().saturating_sub(points)])
            } else {
                opts.periods.clone()
            };
            let trials = forecast::backtest(&y, &periods, opts.horizon, points, &Model::ALL)
                .map_err(in_file)?;
            write_stdout(&render_backtest(opts, &column, points, &periods, &trials))
        }
        None => {
            let fixed = (!opts.periods.is_empty()).then_some(opts.periods.as_slice());
            let s = forecast::select(&y, fixed, opts.horizon, opts.level).map_err(in_file)?;
            write_stdout(&render_forecast(opts, &column, &s))
        }
    }
}

/// Write the report in one go, so a closed pipe (`| head`) is an error, not a panic.
fn write_stdout(text: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| Error::Io {
            what: "writing the report to stdout".into(),
            source,
        })
}

fn render_backtest(
    opts: &Options,
    column: &str,
    points: usize,
    periods: &[usize],
    trials: &[forecast::Trial],
) -> String {
    if opts.json {
        let models: Vec<_> = trials
            .iter()
            .map(|t| match &t.result {
                Ok(s) => json!({"model": t.model, "mase": s.mase, "smape": s.smape}),
                Err(e) => json!({"model": t.model, "error": e.to_string()}),
            })
            .collect();
        let report = json!({
            "column": column,
            "points": points,
            "horizon": opts.horizon,
            "periods": periods,
            "models": models,
        });
        return format!("{report}\n");
    }
    let mut lines = vec![
        format!(
            "backtest of '{column}': last {points} points, rolling origins every {} steps, periods {}",
            opts.horizon,
            list(periods)
        ),
        format!("{:<16} {:>8} {:>9}", "model", "MASE", "sMAPE %"),
    ];
    for t in trials {
        lines.push(match &t.result {
            Ok(s) => format!("{:<16} {:>8.3} {:>9.2}", t.model.name(), s.mase, s.smape),
            Err(e) => format!("{:<16} not scored: {e}", t.model.name()),
        });
    }
    lines.join("\n") + "\n"
}

fn render_forecast(opts: &Options, column: &str, s: &forecast::Selection) -> String {
    let f = &s.forecast;
    if opts.json {
        let report =
            json!({"model": f.model, "point": f.point, "lower": f.lower, "upper": f.upper});
        return format!("{report}\n");
    }
    let mut lines = vec![format!(
        "forecast of '{column}': model {}, periods {}",
        f.model,
        list(&s.periods)
    )];
    if s.trials.is_empty() {
        lines.push("  (the series is too short to backtest: default model)".into());
    }
    for t in &s.trials {
        lines.push(match &t.result {
            Ok(sc) => format!("  backtest {:<16} MASE {:.3}", t.model.name(), sc.mase),
            Err(e) => format!("  backtest {:<16} not scored: {e}", t.model.name()),
        });
    }
    lines.push("step,point,lower,upper".into());
    for (i, ((p, l), u)) in f.point.iter().zip(&f.lower).zip(&f.upper).enumerate() {
        lines.push(format!("{},{p},{l},{u}", i + 1));
    }
    lines.join("\n") + "\n"
}

fn list(periods: &[usize]) -> String {
    if periods.is_empty() {
        return "none".into();
    }
    periods
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The time axis of a row: seconds since 1970 or a bare index.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Key {
    Time(f64),
    Index(f64),
}

impl Key {
    fn parse(s: &str) -> Option<Key> {
        parse_timestamp(s).map(Key::Time).or_else(|| {
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(Key::Index)
        })
    }

    fn value(self) -> f64 {
        match self {
            Key::Time(v) | Key::Index(v) => v,
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Key::Time(_) => " s",
            Key::Index(_) => "",
        }
    }
}

/// The value column's name and its values, checked row by row.
pub fn read_series<R: Read>(
    path: &Path,
    reader: R,
    value_column: Option<&str>,
) -> Result<(String, Vec<f64>), CsvError> {
    let err = |line: u64, message: String| CsvError {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(reader);
    let headers = rdr
        .headers()
        .map_err(|e| err(1, format!("cannot read the header: {e}")))?
        .clone();
    let names: Vec<&str> = headers.iter().map(str::trim).collect();
    if names.len() < 2 {
        return Err(err(
            1,
            "the header needs a timestamp or index column and a value column".into(),
        ));
    }
    let col = match value_column {
        Some(name) => names.iter().position(|n| *n == name).ok_or_else(|| {
            err(
                1,
                format!("no column '{name}'; the columns are {}", names.join(", ")),
            )
        })?,
        None => names.len() - 1,
    };
    if col == 0 {
        return Err(err(
            1,
            format!(
                "'{}' is the first column, which is the time axis; pick a value column",
                names[0]
            ),
        ));
    }
    let column = names[col].to_string();
    let mut values = Vec::new();
    let mut first: Option<Key> = None;
    let mut prev: Option<Key> = None;
    let mut step = 0.0;
    let mut record = csv::StringRecord::new();
    loop {
        let line_before = rdr.position().line();
        match rdr.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                let line = e.position().map_or(line_before, |p| p.line());
                return Err(err(line, format!("malformed CSV: {e}")));
            }
        }
        let line = record.position().map_or(line_before, |p| p.line());
        let Some(cell) = record.get(col) else {
            return Err(err(
                line,
                format!(
                    "the row has {} fields; column '{column}' is field {}",
                    record.len(),
                    col + 1
                ),
            ));
        };
        let cell = cell.trim();
        if cell.is_empty() {
            return Err(err(
                line,
                format!("empty value in column '{column}': a gap in the series"),
            ));
        }
        let v: f64 = cell
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| {
                err(
                    line,
                    format!("'{cell}' in column '{column}' is not a number"),
                )
            })?;
        let key_cell = record.get(0).unwrap_or("").trim();
        let key = Key::parse(key_cell)
            .filter(|k| {
                first.is_none_or(|f| std::mem::discriminant(&f) == std::mem::discriminant(k))
            })
            .ok_or_else(|| {
                let kind = match first {
                    Some(Key::Time(_)) => "a timestamp like the first row's",
                    Some(Key::Index(_)) => "a number like the first row's",
                    None => "a timestamp or a number",
                };
                err(
                    line,
                    format!("'{key_cell}' in column '{}' is not {kind}", names[0]),
                )
            })?;
        if let Some(p) = prev {
            let d = key.value() - p.value();
            if values.len() == 1 {
                if d <= 0.0 {
                    return Err(err(
                        line,
                        format!("'{key_cell}' does not come after the previous row"),
                    ));
                }
                step = d;
            } else if (d - step).abs() > 1e-6 * step.max(1.0) {
                return Err(err(
                    line,
                    format!(
                        "'{key_cell}' comes {d}{u} after the previous row, but the series steps by {step}{u}: a missing, duplicate or irregular row",
                        u = key.unit()
                    ),
                ));
            }
        }
        first.get_or_insert(key);
        prev = Some(key);
        values.push(v);
    }
    if values.is_empty() {
        return Err(err(1, "no data rows after the header".into()));
    }
    Ok((column, values))
}

/// Seconds since 1970-01-01T00:00:00Z of `YYYY-MM-DD[(T| )HH:MM[:SS[.f]]][Z|±HH:MM|±HHMM]`.
fn parse_timestamp(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0i64, |a, d| a * 10 + i64::from(d - b'0')))
    };
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let mut secs = days_from_civil(year, month, day) as f64 * 86_400.0;
    let mut i = 10;
    if i < b.len() && (b[i] == b'T' || b[i] == b' ') {
        let (h, m) = (num(i + 1, 2)?, num(i + 4, 2)?);
        if b.get(i + 3) != Some(&b':') || h > 23 || m > 59 {
            return None;
        }
        secs += (h * 3600 + m * 60) as f64;
        i += 6;
        if b.get(i) == Some(&b':') {
            let sec = num(i + 1, 2)?;
            if sec > 60 {
                return None;
            }
            secs += sec as f64;
            i += 3;
            if b.get(i) == Some(&b'.') {
                let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                if digits == 0 {
                    return None;
                }
                secs += s[i..i + 1 + digits].parse::<f64>().ok()?;
                i += 1 + digits;
            }
        }
    }
    match b.get(i) {
        None => Some(secs),
        Some(b'Z') if i + 1 == b.len() => Some(secs),
        Some(&sign @ (b'+' | b'-')) => {
            let h = num(i + 1, 2)?;
            let colon = usize::from(b.get(i + 3) == Some(&b':'));
            let m = num(i + 3 + colon, 2)?;
            if i + 5 + colon != b.len() || h > 23 || m > 59 {
                return None;
            }
            let offset = (h * 3600 + m * 60) as f64;
            Some(if sign == b'+' {
                secs - offset
            } else {
                secs + offset
            })
        }
        Some(_) => None,
    }
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, column: Option<&str>) -> Result<(String, Vec<f64>), CsvError> {
        read_series(Path::new("load.csv"), text.as_bytes(), column)
    }

    fn fails(text: &str, column: Option<&str>) -> (u64, String) {
        let e = read(text, column).unwrap_err();
        assert!(e.to_string().starts_with(&format!("load.csv:{}: ", e.line)));
        (e.line, e.message)
    }

    #[test]
    fn timestamps_parse_in_every_documented_form() {
        assert_eq!(parse_timestamp("1970-01-01"), Some(0.0));
        assert_eq!(
            parse_timestamp("2011-12-31T13:00:00Z"),
            Some(1_325_336_400.0)
        );
        assert_eq!(parse_timestamp("2011-12-31 13:00"), Some(1_325_336_400.0));
        assert_eq!(
            parse_timestamp("2011-12-31T23:00:00+10:00"),
            Some(1_325_336_400.0)
        );
        assert_eq!(
            parse_timestamp("2011-12-31T03:00:00-1000"),
            Some(1_325_336_400.0)
        );
        assert_eq!(
            parse_timestamp("2010-07-02 00:15:00.5"),
            Some(1_278_029_700.5)
        );
        assert_eq!(parse_timestamp("2024-02-29"), Some(19_782.0 * 86_400.0));
        for bad in [
            "2023-02-29",
            "2011-13-01",
            "2011-12-31T25:00",
            "12/31/2011",
            "2011-12-31X",
            "7",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_by_name_or_last_column_with_timestamps_or_index() {
        let text = "Time,Demand,Temp\n2012-01-01T00:00:00Z,10.5,20\n2012-01-01T00:30:00Z,11,21\n2012-01-01T01:00:00Z,12,22\n";
        assert_eq!(
            read(text, Some("Demand")).unwrap(),
            ("Demand".into(), vec![10.5, 11.0, 12.0])
        );
        assert_eq!(read(text, None).unwrap().1, vec![20.0, 21.0, 22.0]);
        assert_eq!(
            read("i,v\n0,1\n2,2\n4,3\n", None).unwrap().1,
            vec![1.0, 2.0, 3.0]
        );
    }

    #[test]
    fn bad_files_name_the_line_and_the_fault() {
        let (line, msg) = fails("Time,Demand\n2012-01-01,1\n", Some("Load"));
        assert_eq!(line, 1);
        assert!(
            msg.contains("no column 'Load'") && msg.contains("Time, Demand"),
            "{msg}"
        );
        let (line, msg) = fails("t,v\n0,1\n1,abc\n2,3\n", None);
        assert_eq!(
            (line, msg.as_str()),
            (3, "'abc' in column 'v' is not a number")
        );
        let (line, msg) = fails("t,v\n0,1\n1,\n2,3\n", None);
        assert_eq!(line, 3);
        assert!(msg.contains("gap"), "{msg}");
        let (line, msg) = fails("t,v\n0,1\n1,2\n3,3\n", None);
        assert_eq!(line, 4);
        assert!(
            msg.contains("comes 2 after") && msg.contains("steps by 1"),
            "{msg}"
        );
        let (line, msg) = fails(
            "t,v\n2012-01-01T00:00:00Z,1\n2012-01-01T00:30:00Z,2\n2012-01-01T00:30:00Z,3\n",
            None,
        );
        assert_eq!(line, 4);
        assert!(
            msg.contains("comes 0 s after") && msg.contains("1800 s"),
            "{msg}"
        );
        let (line, msg) = fails("t,v\n2012-01-01,1\n5,2\n", None);
        assert_eq!(line, 3);
        assert!(
            msg.contains("not a timestamp like the first row's"),
            "{msg}"
        );
        let (line, msg) = fails("t,v\n1,1\n0,2\n", None);
        assert_eq!(line, 3);
        assert!(msg.contains("does not come after"), "{msg}");
        let (line, msg) = fails("t,v,w\n0,1,2\n1,2\n", Some("w"));
        assert_eq!(line, 3);
        assert!(msg.contains("has 2 fields"), "{msg}");
        assert_eq!(fails("t,v\n", None).0, 1);
        assert_eq!(fails("v\n1\n", None).0, 1);
        assert!(fails("t,v\n0,1\n", Some("t")).1.contains("time axis"));
        assert!(fails("t,v\n0,inf\n", None).1.contains("not a number"));
    }
}
