#!/usr/bin/env python3
"""Day-ahead accuracy of `flowshard forecast` on the real load series, next to
statsforecast's AutoETS, MSTL and SeasonalNaive on the same rolling-origin split.

Not part of `make test`: it takes a few minutes and needs statsforecast. Set-up:

    python3 -m venv "$FLOWSHARD_DATA/venv-statsforecast"
    "$FLOWSHARD_DATA/venv-statsforecast/bin/pip" install statsforecast==2.1.1 pandas
    "$FLOWSHARD_DATA/venv-statsforecast/bin/python" scripts/forecast-eval.py [--shift-weeks K] [NAME]

NAME keeps only the series whose name contains it (e.g. `pedestrian`).
--no-statsforecast skips statsforecast where its scores are not cached: it takes
about 10 minutes per hotgym series.
--shift-weeks K moves the test week K weeks back from the end of each series: the
series end in late December, so the default test week is a holiday week.
FLOWSHARD_BIN names the binary (default target/release/flowshard).

Without statsforecast it reports flowshard's figures alone.

Series (from scripts/fetch-data.sh): vic_elec Demand (half-hourly, periods 48 and
336), each pedestrian sensor (hourly, 24 and 168) and each hotgym gym (15-minute,
96 and 672). A series with missing steps is cut to its longest run without gaps,
since the forecaster refuses gaps, and then to its last 16 weeks plus the test
week. Split: the last 7 days, forecast one day at a time from 7 origins, each model
fitted on everything before its origin. MASE is
scaled by the in-sample daily seasonal-naive MAE of the part before the window,
the same scale for every model and for both tools. statsforecast's scores are
cached beside the series CSVs in $FLOWSHARD_DATA/ts/eval.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

DATA = Path(os.environ.get("FLOWSHARD_DATA", Path.home() / ".cache/flowshard-data"))
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("FLOWSHARD_BIN", ROOT / "target/release/flowshard"))
DAYS = 7
# History given to every model: the last 16 weeks before each origin, as the agent's
# bounded history holds. (statsforecast's AutoETS takes tens of minutes on the
# 3 years of half-hourly demand.)
WEEKS = 16


def parse_time(s):
    s = s.strip().replace("Z", "+00:00")
    return datetime.fromisoformat(s)


def longest_run(rows, step):
    """Longest stretch of (time, value) rows whose times advance by exactly `step`."""
    best, start = (0, 0), 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][0] - rows[i - 1][0] != step:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = i
    return rows[best[0] : best[1]]


def series():
    """(name, rows, periods): rows are (datetime, value), regular and gap-free."""
    ts = DATA / "ts"
    out = []
    with open(ts / "vic_elec.csv") as f:
        rows = [(parse_time(r["Time"]), float(r["Demand"])) for r in csv.DictReader(f)]
    out.append(("vic_elec", longest_run(rows, timedelta(minutes=30)), [48, 336]))
    sensors = {}
    with open(ts / "pedestrian.csv") as f:
        for r in csv.DictReader(f):
            sensors.setdefault(r["Sensor"], []).append((parse_time(r["Date_Time"]), float(r["Count"])))
    for name, rows in sorted(sensors.items()):
        out.append((f"pedestrian/{name}", longest_run(sorted(rows), timedelta(hours=1)), [24, 168]))
    gyms = {}
    with open(ts / "hotgym.csv") as f:
        lines = f.read().splitlines()
    # nupic's format: a header, then a row of types and a row of flags.
    for r in csv.DictReader(lines[:1] + lines[3:]):
        gyms.setdefault(r["gym"], []).append((parse_time(r["timestamp"]), float(r["consumption"])))
    for name, rows in sorted(gyms.items()):
        out.append((f"hotgym/{name}", longest_run(sorted(rows), timedelta(minutes=15)), [96, 672]))
    return out


def scale(train, m):
    return sum(abs(a - b) for a, b in zip(train[m:], train)) / (len(train) - m)


def scores(actual, predicted, mase_scale):
    abs_err = [abs(a - p) for a, p in zip(actual, predicted)]
    smape = [200 * e / (abs(a) + abs(p)) if abs(a) + abs(p) > 0 else 0.0 for e, a, p in zip(abs_err, actual, predicted)]
    return sum(abs_err) / len(abs_err) / mase_scale, sum(smape) / len(smape)


def flowshard(path, periods, horizon, points):
    cmd = [str(BIN), "forecast", "--csv", str(path), "--value-column", "value",
           "--period", ",".join(map(str, periods)), "--horizon", str(horizon),
           "--backtest", str(points), "--json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {m["model"]: (m.get("mase"), m.get("smape")) for m in out["models"]}


def flowshard_auto(rows, periods, horizon, points, tmp, mase_scale):
    """The automatic choice, as the agent makes it: forecast from each origin."""
    y = [v for _, v in rows]
    n = len(y)
    predicted, chosen = [], []
    for origin in range(n - points, n, horizon):
        write_csv(tmp, rows[:origin])
        cmd = [str(BIN), "forecast", "--csv", str(tmp), "--value-column", "value",
               "--period", ",".join(map(str, periods)), "--horizon", str(horizon), "--json"]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        predicted += out["point"]
        chosen.append(out["model"])
    return scores(y[n - points :], predicted, mase_scale), chosen


def statsforecast(y, periods, horizon, points, mase_scale):
    try:
        import pandas as pd
        from statsforecast import StatsForecast
        from statsforecast.models import MSTL, AutoETS, SeasonalNaive
    except ImportError:
        return None
    df = pd.DataFrame({"unique_id": "s", "ds": range(len(y)), "y": y})
    models = [
        SeasonalNaive(season_length=periods[0], alias="SeasonalNaive"),
        AutoETS(season_length=periods[0], alias="AutoETS"),
        MSTL(season_length=periods, trend_forecaster=AutoETS(model="ZZN"), alias="MSTL"),
    ]
    sf = StatsForecast(models=models, freq=1, n_jobs=1)
    cv = sf.cross_validation(df=df, h=horizon, step_size=horizon, n_windows=points // horizon)
    return {m: scores(cv["y"].tolist(), cv[m].tolist(), mase_scale) for m in ["SeasonalNaive", "AutoETS", "MSTL"]}


def cached(path, key, compute):
    """statsforecast's scores, kept beside the series: they take minutes and do not
    change while flowshard's models do."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            return saved["scores"]
    scores = compute()
    if scores is not None:
        path.write_text(json.dumps({"key": key, "scores": scores}))
    return scores


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time", "value"])
        for t, v in rows:
            w.writerow([t.isoformat(), v])


def main():
    if not BIN.exists():
        sys.exit(f"build first: cargo build --release -p flowshard ({BIN} is missing)")
    work = DATA / "ts" / "eval"
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'series':<44} {'points':>7} {'model':<22} {'MASE':>7} {'sMAPE%':>7}")
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--shift-weeks", type=int, default=0)
    args.add_argument("--no-statsforecast", action="store_true",
                      help="flowshard's figures only, unless statsforecast's are cached")
    args.add_argument("name", nargs="?", default="")
    args = args.parse_args()
    only = args.name
    for name, rows, periods in series():
        if only not in name:
            continue
        day = periods[0]
        points = DAYS * day
        end = len(rows) - args.shift_weeks * 7 * day
        rows = rows[end - (WEEKS + DAYS // 7) * 7 * day : end]
        path = work / (name.replace("/", "_").replace(" ", "_") + f"-shift{args.shift_weeks}.csv")
        write_csv(path, rows)
        y = [v for _, v in rows]
        mase_scale = scale(y[: len(y) - points], day)
        t0 = time.monotonic()
        results = {f"flowshard {m}": s for m, s in flowshard(path, periods, day, points).items()}
        origin = path.with_suffix(".origin.csv")
        auto, chosen = flowshard_auto(rows, periods, day, points, origin, mase_scale)
        results["flowshard auto"] = auto
        t1 = time.monotonic()
        sf = cached(path.with_suffix(".statsforecast.json"), [len(y), sum(y), periods],
                    lambda: None if args.no_statsforecast else statsforecast(y, periods, day, points, mase_scale))
        t2 = time.monotonic()
        for m, s in (sf or {}).items():
            results[f"statsforecast {m}"] = s
        for model, (mase, smape) in results.items():
            if mase is None:
                print(f"{name:<44} {len(y):>7} {model:<22} not scored")
            else:
                print(f"{name:<44} {len(y):>7} {model:<22} {mase:>7.3f} {smape:>7.2f}")
        print(f"{name:<44} {'':>7} auto chose: {', '.join(chosen)}")
        print(f"{name:<44} {'':>7} time: flowshard {t1 - t0:.1f} s, statsforecast {t2 - t1:.1f} s")
        sys.stdout.flush()
        if sf is None:
            print(f"{name:<44} {'':>7} statsforecast not run (not installed, or --no-statsforecast)")


if __name__ == "__main__":
    main()
