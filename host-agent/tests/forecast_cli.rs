//! `flowshard forecast` end to end: the binary on a real load series (Victorian
//! electricity demand, fetched by `scripts/setup.sh` into `$FLOWSHARD_DATA`) and on
//! bad files. `make test` always fetches the data, so the real-series tests only
//! skip (with a notice) when run by hand without it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn flowshard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowshard"))
        .args(args)
        .output()
        .expect("run flowshard")
}

fn vic_elec() -> Option<PathBuf> {
    let f = flowshard::profiler::data_dir().join("ts/vic_elec.csv");
    if f.is_file() {
        Some(f)
    } else {
        eprintln!("SKIP: no {} (run scripts/setup.sh)", f.display());
        None
    }
}

/// `weeks` weeks of the series ending four weeks before its end (an ordinary
/// December 2014 Wednesday, clear of the Christmas holidays that close the series)
/// as a CSV of its own, with the last day held out: (file, held-out demand,
/// in-sample daily seasonal-naive MAE).
fn recent_weeks(src: &Path, weeks: usize, dir: &Path) -> (PathBuf, Vec<f64>, f64) {
    let text = std::fs::read_to_string(src).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let rows: Vec<&str> = lines.collect();
    let end = rows.len() - 4 * 336;
    let rows = &rows[end - weeks * 336..end];
    let (train, test) = rows.split_at(rows.len() - 48);
    let demand = |row: &&str| row.split(',').nth(1).unwrap().parse::<f64>().unwrap();
    let y: Vec<f64> = train.iter().map(demand).collect();
    let scale = y.windows(49).map(|w| (w[48] - w[0]).abs()).sum::<f64>() / (y.len() - 48) as f64;
    let path = dir.join("vic_elec_recent.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{header}").unwrap();
    for row in train {
        writeln!(f, "{row}").unwrap();
    }
    (path, test.iter().map(demand).collect(), scale)
}

fn numbers(v: &serde_json::Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no array '{key}' in {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn forecasts_a_day_of_real_electricity_demand() {
    let Some(src) = vic_elec() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (csv, actual, scale) = recent_weeks(&src, 8, dir.path());
    let out = flowshard(&[
        "forecast",
        "--csv",
        csv.to_str().unwrap(),
        "--value-column",
        "Demand",
        "--horizon",
        "48",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 4, "{v}");
    assert!(
        ["seasonal_naive", "ets", "mstl", "arima", "combination"]
            .contains(&v["model"].as_str().unwrap())
    );
    let (point, lower, upper) = (
        numbers(&v, "point"),
        numbers(&v, "lower"),
        numbers(&v, "upper"),
    );
    assert_eq!((point.len(), lower.len(), upper.len()), (48, 48, 48));
    assert!((0..48).all(|i| lower[i] <= point[i] && point[i] <= upper[i]));
    // The held-out day is forecast better than repeating yesterday does on average.
    let mae = point
        .iter()
        .zip(&actual)
        .map(|(p, a)| (p - a).abs())
        .sum::<f64>()
        / 48.0;
    assert!(mae / scale < 1.0, "day-ahead MASE {}", mae / scale);
    let covered = (0..48)
        .filter(|&i| lower[i] <= actual[i] && actual[i] <= upper[i])
        .count();
    assert!(
        covered >= 24,
        "the 95 % interval covers {covered} of 48 points"
    );
}

#[test]
fn backtests_every_model_on_real_electricity_demand() {
    let Some(src) = vic_elec() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (csv, _, _) = recent_weeks(&src, 6, dir.path());
    let out = flowshard(&[
        "forecast",
        "--csv",
        csv.to_str().unwrap(),
        "--value-column",
        "Demand",
        "--period",
        "48,336",
        "--horizon",
        "48",
        "--backtest",
        "96",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["periods"], serde_json::json!([48, 336]));
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), 5);
    for m in models {
        let mase = m["mase"].as_f64().unwrap_or_else(|| panic!("{m}"));
        let smape = m["smape"].as_f64().unwrap();
        assert!(
            mase > 0.0 && mase < 5.0 && smape > 0.0 && smape < 50.0,
            "{m}"
        );
    }
}

#[test]
fn bad_files_exit_64_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let gap = dir.path().join("gap.csv");
    std::fs::write(&gap, "t,v\n0,1\n1,2\n3,3\n").unwrap();
    let good = dir.path().join("good.csv");
    std::fs::write(&good, "t,v\n0,1\n1,2\n2,3\n").unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--csv", gap.to_str().unwrap()], ":4: '3' comes 2 after"),
        (
            &["--csv", gap.to_str().unwrap(), "--value-column", "load"],
            ":1: no column 'load'",
        ),
        (
            &["--csv", good.to_str().unwrap(), "--level", "1.5"],
            "level must lie strictly between 0 and 1",
        ),
    ];
    for (args, expect) in cases {
        let mut all = vec!["forecast", "--horizon", "2"];
        all.extend_from_slice(args);
        let out = flowshard(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let out = flowshard(&["forecast", "--csv", "/nonexistent.csv", "--horizon", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.csv"));
}
