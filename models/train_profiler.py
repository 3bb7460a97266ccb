"""Train the flow profiler from real labelled traffic and export it as ONNX and NIC tables.

One run, `make model`, does everything from the cached captures to the committed files:

1. features: `flowshard features` runs each training capture (data/ndpi-train-pcaps.txt)
   through the NIC data plane and writes each flow's first feature record as the
   profiler's input vector — the product's own code, so training and serving agree;
2. labels: each flow's nDPI category from the capture's nDPI result file, joined by
   protocol and both endpoints, mapped to the product's classes;
3. validation split by capture file (no capture on both sides), for N = 4, 8, 12, 16;
4. the final model (N = --packets) on every training capture, exported as ONNX (plain
   tensors: `label`, `probabilities`), its trees as NIC tables, its metrics and checksums.
"""

import argparse
import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnxruntime
from onnx import helper
from skl2onnx import to_onnx
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.model_selection import GroupKFold

CLASSES = ["video", "realtime", "bulk", "web", "messaging", "infra", "other"]
CATEGORY_CLASS = {
    **dict.fromkeys(["Video", "Streaming", "Music", "Media"], "video"),
    **dict.fromkeys(["VoIP", "Game"], "realtime"),
    **dict.fromkeys(
        ["Download", "DataTransfer", "SoftwareUpdate", "Cloud", "Database", "Mining"], "bulk"
    ),
    **dict.fromkeys(
        ["Web", "SocialNetwork", "Collaborative", "Advertisement", "VirtAssistant", "Shopping"],
        "web",
    ),
    **dict.fromkeys(["Chat", "Email", "IoT-Scada"], "messaging"),
    **dict.fromkeys(["Network", "System", "RPC", "ConnCheck", "RemoteAccess", "VPN"], "infra"),
}
PROTO_NUMBERS = {"ICMP": 1, "IGMP": 2, "TCP": 6, "UDP": 17, "GRE": 47, "ESP": 50,
                 "ICMPV6": 58, "VRRP": 112, "SCTP": 132}
# One flow line of an nDPI result file: index, protocol, both endpoints, then fields.
FLOW_LINE = re.compile(r"^\s*\d+\s+(\S+)\s+(\S+)\s+<?->\s+(\S+)\s+\[proto:")
CATEGORY = re.compile(r"\[cat: ([^/\]]+)/")
# Model size: bounded so the NIC tables stay small and inference fast.
FOREST = dict(n_estimators=24, max_depth=10, min_samples_leaf=2, max_features="sqrt",
              class_weight="balanced_subsample", random_state=7, n_jobs=1)
SCORE_ONE = 1 << 15
VALIDATION_PACKETS = [4, 8, 12, 16]


def endpoint(text):
    """'1.2.3.4:80' or '[2001:db8::1]:443' -> (address, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def labels(result_file):
    """Flow key -> class name for every flow of one nDPI result file."""
    out = {}
    with open(result_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = FLOW_LINE.match(line)
            if not m:
                continue
            proto = PROTO_NUMBERS.get(m.group(1).upper())
            if proto is None:
                if not m.group(1).isdigit():
                    continue
                proto = int(m.group(1))
            try:
                a, b = endpoint(m.group(2)), endpoint(m.group(3))
            except ValueError:
                continue
            cat = CATEGORY.search(line)
            out[(proto, frozenset([a, b]))] = CATEGORY_CLASS.get(cat.group(1) if cat else "", "other")
    return out


def extract(flowshard, pcap, packets, out_csv):
    """The NIC's per-flow input vectors of one capture (the product's own extraction)."""
    run = subprocess.run(
        [flowshard, "features", "--pcap", pcap, "--out", out_csv, "--packets", str(packets)],
        capture_output=True, text=True)
    if run.returncode != 0:
        # A capture that ends in a damaged record still yields the flows before it.
        print(f"  note: {os.path.basename(pcap)}: {run.stderr.strip()}", file=sys.stderr)
    if not os.path.exists(out_csv):
        sys.exit(f"flowshard features wrote nothing for {pcap}: {run.stderr}")
    with open(out_csv, newline="") as f:
        return list(csv.DictReader(f))


def dataset(flowshard, data, captures, packets, tmp):
    """X, y, capture index per flow; and the feature names from the CSV header."""
    xs, ys, groups, names = [], [], [], None
    unlabelled = 0
    for g, name in enumerate(captures):
        truth = labels(os.path.join(data, "ndpi", "result", name + ".out"))
        rows = extract(flowshard, os.path.join(data, "ndpi", "pcap", name), packets,
                       os.path.join(tmp, f"{packets}-{name}.csv"))
        for r in rows:
            if names is None:
                names = [k for k in r if k not in ("client", "server", "packets")]
            key = (int(r["proto"]), frozenset([(r["client"], int(r["client_port"])),
                                               (r["server"], int(r["server_port"]))]))
            cls = truth.get(key)
            if cls is None:
                unlabelled += 1
                continue
            xs.append([int(r[n]) for n in names])
            ys.append(CLASSES.index(cls))
            groups.append(g)
    print(f"N={packets}: {len(ys)} labelled flows from {len(captures)} captures "
          f"({unlabelled} flows without an nDPI line)", file=sys.stderr)
    return np.array(xs, dtype=np.float32), np.array(ys), np.array(groups), names


def report(y, pred):
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(len(CLASSES)),
                                                 zero_division=0)
    return {
        "macro_f1": float(f1_score(y, pred, labels=range(len(CLASSES)), average="macro",
                                   zero_division=0)),
        "accuracy": float(np.mean(y == pred)),
        "flows": int(len(y)),
        "per_class": {c: {"precision": round(float(p[i]), 3), "recall": round(float(r[i]), 3),
                          "f1": round(float(f[i]), 3), "support": int(s[i])}
                      for i, c in enumerate(CLASSES)},
        "confusion": confusion_matrix(y, pred, labels=range(len(CLASSES))).tolist(),
    }


def validate(X, y, groups, folds):
    """Predictions for every flow from a model that never saw its capture."""
    pred = np.zeros_like(y)
    for train, test in GroupKFold(n_splits=folds).split(X, y, groups):
        model = RandomForestClassifier(**FOREST).fit(X[train], y[train])
        pred[test] = model.predict(X[test])
    return pred


def trees_json(model, packets, names):
    """The forest as the NIC loads it: per tree scikit-learn's node arrays, integer
    thresholds (features are integers, so x <= 442.5 is x <= 442) and leaf class
    probabilities scaled to 2^15."""
    trees = []
    for est in model.estimators_:
        t = est.tree_
        # Leaf rows of `value` are class fractions; the classes are 0..6 in order.
        dist = t.value[:, 0, :] / np.maximum(t.value[:, 0, :].sum(axis=1, keepdims=True), 1e-12)
        full = np.zeros((t.node_count, len(CLASSES)))
        full[:, model.classes_] = dist
        trees.append({
            "feature": [int(max(f, 0)) for f in t.feature],
            "threshold": [int(np.floor(max(v, 0.0))) for v in t.threshold],
            "left": [int(v) for v in t.children_left],
            "right": [int(v) for v in t.children_right],
            "scores": np.rint(full * SCORE_ONE).astype(int).tolist(),
        })
    return {"packets": packets, "features": names, "trees": trees}


def export_onnx(model, packets, names, path):
    onx = to_onnx(model, np.zeros((1, len(names)), dtype=np.float32),
                  options={id(model): {"zipmap": False}},
                  initial_types=None, target_opset={"": 17, "ai.onnx.ml": 3})
    onx.graph.input[0].name = "features"
    for node in onx.graph.node:
        node.input[:] = ["features" if i == "X" else i for i in node.input]
    helper.set_model_props(onx, {
        "flowshard.packets": str(packets),
        "flowshard.features": ",".join(names),
        "flowshard.classes": ",".join(CLASSES),
    })
    onx.producer_name = "flowshard models/train_profiler.py"
    onnx.checker.check_model(onx)
    with open(path, "wb") as f:
        f.write(onx.SerializeToString())


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flowshard", required=True, help="the flowshard binary")
    ap.add_argument("--data", required=True, help="FLOWSHARD_DATA (ndpi/pcap, ndpi/result)")
    ap.add_argument("--captures", required=True, help="list of training captures")
    ap.add_argument("--out", required=True, help="directory for the model files")
    ap.add_argument("--packets", type=int, default=8, help="N of the shipped model")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()

    with open(args.captures) as f:
        captures = [l.strip() for l in f if l.strip()]
    metrics = {"validation": {}, "classes": CLASSES, "forest": FOREST}
    with tempfile.TemporaryDirectory() as tmp:
        final = None
        for n in sorted(set(VALIDATION_PACKETS + [args.packets])):
            X, y, groups, names = dataset(args.flowshard, args.data, captures, n, tmp)
            r = report(y, validate(X, y, groups, args.folds))
            metrics["validation"][str(n)] = r
            print(f"N={n}: by-capture {args.folds}-fold macro-F1 {r['macro_f1']:.3f}, "
                  f"accuracy {r['accuracy']:.3f}", file=sys.stderr)
            if n == args.packets:
                final = (X, y, groups, names)
    X, y, groups, names = final
    metrics["training"] = {
        "captures": len(set(groups.tolist())),
        "flows": int(len(y)),
        "flows_per_class": {CLASSES[k]: v for k, v in sorted(Counter(y.tolist()).items())},
    }
    model = RandomForestClassifier(**FOREST).fit(X, y)
    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "profiler.onnx")
    trees_path = os.path.join(args.out, "profiler.trees.json")
    export_onnx(model, args.packets, names, onnx_path)
    with open(trees_path, "w") as f:
        json.dump(trees_json(model, args.packets, names), f, separators=(",", ":"))
        f.write("\n")

    # The exported graph must decide as the trained model does.
    sess = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    label, _ = sess.run(["label", "probabilities"], {"features": X})
    agree = float(np.mean(label == model.predict(X)))
    metrics["onnx_agreement_with_sklearn"] = agree
    if agree < 0.999:
        sys.exit(f"ONNX export disagrees with the trained model on {1 - agree:.2%} of flows")
    metrics["packets"] = args.packets
    with open(os.path.join(args.out, "profiler.metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "profiler.sha256"), "w") as f:
        for p in (onnx_path, trees_path):
            f.write(f"{sha256(p)}  {os.path.basename(p)}\n")
    v = metrics["validation"][str(args.packets)]
    print(f"model: N={args.packets}, by-capture macro-F1 {v['macro_f1']:.3f}; "
          f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
