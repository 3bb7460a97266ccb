"""Train the flow profiler from real labelled traffic and export it as ONNX and NIC tables.

One run, `make model`, does everything from the cached captures to the committed files:

1. features: `flowshard features` runs each training capture (data/ndpi-train-pcaps.txt)
   through the NIC data plane and writes each flow's first feature record as the
   profiler's input vector — the product's own code, so training and serving agree;
2. labels: each flow's nDPI category from the capture's nDPI result file, joined by
   protocol and both endpoints, mapped to the product's classes; flows whose label is
   an application's found inside a carrier protocol (see CARRIERS) are validated on but
   not trained on;
3. validation split by capture file (no capture on both sides), for N = 4, 8, 12, 16;
4. the final model (N = --packets) on every training capture, exported as ONNX (plain
   tensors: `label`, `probabilities`), its trees as NIC tables, its metrics and checksums.

The model is a gradient-boosted tree ensemble (SoftmaxBoost: one multi-output
scikit-learn regression tree per round, scoring every class). Both exports are written
here from the same tree list: the ONNX graph is a TreeEnsembleClassifier (softmax of the
summed leaf values), the NIC gets each tree's leaf values as integer class scores whose
argmax is the same.
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
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.model_selection import GroupKFold
from sklearn.tree import DecisionTreeRegressor
from threadpoolctl import threadpool_limits

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
# The carrier of a flow in which nDPI found an application: "TLS" of
# "[proto: 91.133/TLS.NetFlix]" (a flow of one protocol, "[proto: 7/HTTP]", has none).
PROTOCOL = re.compile(r"\[proto: [^/\]]*/([^.\]]+)\.")
# Carrier protocols and the class of their own traffic. nDPI labels a flow with the
# category of the application it finds inside a carrier: a Netflix capture's DNS lookups
# and HTTPS to its CDN are `video`, WeChat's HTTPS is `messaging`, a web page's DNS
# lookups are `web`. A flow's first packets show the carrier (a DNS query, a TLS or HTTP
# handshake), not the application, so a flow whose class differs from its carrier's is
# not trained on (the model would learn that a DNS query is `video` in some captures and
# `infra` in others); validation still counts every flow with nDPI's label.
CARRIERS = {"DNS": "infra", "TLS": "web", "HTTP": "web", "QUIC": "web"}
# Model size: bounded so ONNX Runtime classifies over a million flows a second on one core
# and the NIC tables stay small. ONNX Runtime's cost grows with trees x depth; each round
# is one tree that scores all seven classes (scikit-learn's boosting grows one tree per
# class and round, 7x the trees for the same rounds), so 20 rounds of trees of at most 31
# leaves + the baseline = 21 trees (the NIC takes up to 256).
BOOSTING = dict(rounds=20, max_leaf_nodes=31, learning_rate=0.3, l2_regularization=1.0,
                random_state=7)
# A leaf's Newton step is clipped to this many log-odds units (before the learning rate):
# a leaf of one class only would otherwise step without bound.
MAX_STEP = 8.0
# Sample weights: a flow weighs 1/sqrt(flows of its capture), then each class's weights
# are scaled to the same total (as class_weight="balanced" does). Without the first, the
# three largest captures (55 % of the flows) decide most splits; with 1/flows, the many
# small captures' few flows do.
CAPTURE_WEIGHT_POWER = 0.5
# Shuffled by-capture splits for the shipped N's spread: the pooled figure of one split
# swings with where a few large captures fall.
ROBUSTNESS_SEEDS = [1, 2, 3, 4, 5]
# NIC class scores: leaf values in steps of 2^-k (the finest that fits 16 bits, at most
# 2^-12), shifted per tree so none is negative (one shift for every leaf and class of a
# tree adds the same to every class's sum, so the argmax is unchanged).
SCORE_MAX = (1 << 16) - 1
VALIDATION_PACKETS = [4, 8, 12, 16]


def endpoint(text):
    """'1.2.3.4:80' or '[2001:db8::1]:443' -> (address, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def labels(result_file):
    """Flow key -> (class name, whether to train on it: not when the class is that of an
    application inside a carrier, see CARRIERS) for every flow of one nDPI result file."""
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
            cls = CATEGORY_CLASS.get(cat.group(1) if cat else "", "other")
            carrier = PROTOCOL.search(line)
            trainable = carrier is None or CARRIERS.get(carrier.group(1), cls) == cls
            out[(proto, frozenset([a, b]))] = (cls, trainable)
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
    """X, y, capture index, whether to train on it (see CARRIERS) per flow; and the
    feature names from the CSV header."""
    xs, ys, groups, trainable, names = [], [], [], [], None
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
            label = truth.get(key)
            if label is None:
                unlabelled += 1
                continue
            xs.append([int(r[n]) for n in names])
            ys.append(CLASSES.index(label[0]))
            groups.append(g)
            trainable.append(label[1])
    print(f"N={packets}: {len(ys)} labelled flows from {len(captures)} captures "
          f"({unlabelled} flows without an nDPI line, {trainable.count(False)} labelled by "
          f"an application inside a carrier)", file=sys.stderr)
    return (np.array(xs, dtype=np.float32), np.array(ys), np.array(groups),
            np.array(trainable), names)


# Well-known service ports by kind: the Rust side's PORT_GROUPS (nic_firmware::profile),
# repeated here so the pipeline checks the derived features `flowshard features` wrote.
PORT_GROUPS = {
    1: [80, 8080, 8000, 8008, 8081, 8888, 3128],
    2: [443, 8443],
    3: [53, 853, 5353, 5355],
    4: [123, 67, 68, 137, 138, 139, 445, 161, 162, 514, 1900, 111, 135, 88, 389, 636, 546,
        547, 3702],
    5: [25, 465, 587, 110, 995, 143, 993, 5222, 5223, 5228, 1883, 8883, 5683, 5684, 502,
        20000, 102, 2404, 47808, 6667],
    6: [3478, 3479, 3480, 3481, 5060, 5061, 5004, 5005] + list(range(19302, 19310)),
    7: [22, 23, 3389, 5900, 1194, 500, 4500, 1701, 1723, 51820, 992],
    8: [20, 21, 69, 873, 3306, 5432, 1433, 1521, 27017, 6379, 11211, 9092]
       + list(range(6881, 6890)),
    9: [554, 1935, 8554, 1755],
}
PORT_GROUP = {p: g for g, ps in PORT_GROUPS.items() for p in ps}


def derived(X, names):
    """The derived features, recomputed from the record's own columns (an independent
    check of nic_firmware::profile::features)."""
    c = lambda k: X[:, names.index(k)].astype(np.int64)
    n, P = c("n"), 16
    size = np.stack([c(f"size_{i}") for i in range(P)], 1)
    iat = np.stack([c(f"iat_us_{i}") for i in range(P)], 1)
    down = np.stack([(c("directions") >> i) & 1 for i in range(P)], 1).astype(bool)
    valid = np.arange(P)[None, :] < n[:, None]
    up, dn = valid & ~down, valid & down
    sp, cp = c("server_port"), c("client_port")
    group = lambda ports: np.array([PORT_GROUP.get(int(p), 0) for p in ports])
    prange = lambda p: np.where(p < 1024, 0, np.where(p < 49152, 1, 2))
    data = valid & (size >= np.where(c("proto") == 6, 80, 0)[:, None])
    big = valid & (size >= 1200)

    def nth(mask, k):
        return (size * (mask & (np.cumsum(mask, 1) == k + 1))).sum(1)

    out = {"port_group": np.where(group(sp) > 0, group(sp), group(cp)),
           "low_port": np.minimum(sp, cp), "server_port_range": prange(sp),
           "client_port_range": prange(cp),
           "data_up": (data & up).sum(1), "data_down": (data & dn).sum(1),
           "big_up": (big & up).sum(1), "big_down": (big & dn).sum(1)}
    for k in range(3):
        out[f"up_{k}"], out[f"down_{k}"] = nth(up, k), nth(dn, k)
    for k in range(3):
        out[f"data_up_{k}"], out[f"data_down_{k}"] = nth(data & up, k), nth(data & dn, k)
    out["dir_changes"] = ((down[:, 1:] != down[:, :-1]) & valid[:, 1:]).sum(1)
    tot = c("bytes_up") + c("bytes_down")
    out["down_share"] = np.where(tot > 0, c("bytes_down") * 64 // np.maximum(tot, 1), 0)
    later = valid.copy()
    later[:, 0] = False
    out["max_iat_us"] = (iat * later).max(1)
    out["min_iat_us"] = np.where(n > 1, np.where(later, iat, 1 << 23).min(1), 0)
    out["mean_iat_us"] = np.where(n > 1, c("duration_us") // np.maximum(n - 1, 1), 0)
    out["mean_size"] = np.where(n > 0, tot // np.maximum(n, 1), 0)
    return out


def check_derived(X, names):
    for k, v in derived(X, names).items():
        bad = np.flatnonzero(X[:, names.index(k)].astype(np.int64) != v)
        if len(bad):
            sys.exit(f"derived feature {k} of `flowshard features` differs from its "
                     f"definition on {len(bad)} flows (first: row {bad[0]})")


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


def weights(y, groups):
    """Per-flow training weights: capture-balanced, then class-balanced (see
    CAPTURE_WEIGHT_POWER); mean 1."""
    per_capture = Counter(groups.tolist())
    w = np.array([per_capture[g] ** -CAPTURE_WEIGHT_POWER for g in groups.tolist()])
    class_total = np.array([w[y == c].sum() for c in range(len(CLASSES))])
    w = w / class_total[y]
    return w / w.mean()


class SoftmaxBoost:
    """Gradient boosting of the softmax loss in which each round is one multi-output
    regression tree (scikit-learn's DecisionTreeRegressor, best-first to BOOSTING's
    leaves) fitted to all classes' gradients at once, each leaf then taking a Newton
    step per class (Friedman's multiclass step, (K-1)/K * sum g / (sum h + l2); the l2
    term, in units of the mean flow weight, damps leaves of few flows). One tree per
    round instead of one per class and round is what keeps inference fast."""

    def __init__(self, rounds, max_leaf_nodes, learning_rate, l2_regularization,
                 random_state):
        self.rounds = rounds
        self.max_leaf_nodes = max_leaf_nodes
        self.learning_rate = learning_rate
        self.l2_regularization = l2_regularization
        self.random_state = random_state

    def fit(self, X, y, sample_weight):
        k = len(CLASSES)
        w = sample_weight
        onehot = np.eye(k)[y]
        prior = np.array([w[y == c].sum() for c in range(k)]) / w.sum()
        self.baseline = np.log(np.maximum(prior, 1e-6))
        self.baseline -= self.baseline.mean()
        raw = np.tile(self.baseline, (len(y), 1))
        self.trees = []
        for _ in range(self.rounds):
            p = np.exp(raw - raw.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            grad, hess = onehot - p, p * (1 - p)
            tree = DecisionTreeRegressor(max_leaf_nodes=self.max_leaf_nodes,
                                         random_state=self.random_state)
            tree.fit(X, grad, sample_weight=w)
            leaf = tree.apply(X)
            values = np.zeros((tree.tree_.node_count, k))
            for node in np.unique(leaf):
                at = leaf == node
                g = (w[at, None] * grad[at]).sum(0)
                h = (w[at, None] * hess[at]).sum(0)
                values[node] = (k - 1) / k * g / np.maximum(h + self.l2_regularization, 1e-9)
            values = np.clip(values, -MAX_STEP, MAX_STEP) * self.learning_rate
            self.trees.append((tree, values))
            raw += values[leaf]
        return self

    def predict(self, X):
        raw = np.tile(self.baseline, (len(X), 1))
        for tree, values in self.trees:
            raw += values[tree.apply(X)]
        return raw.argmax(1)


def fit(X, y, groups, trainable):
    """The shipped model's training, the same for validation folds and the final model:
    on the flows whose label their carrier can show (see CARRIERS)."""
    X, y, groups = X[trainable], y[trainable], groups[trainable]
    return SoftmaxBoost(**BOOSTING).fit(X, y, sample_weight=weights(y, groups))


def validate(X, y, groups, trainable, folds, seed=None):
    """Predictions for every flow from a model that never saw its capture (captures
    dealt to folds by size, or shuffled with `seed`)."""
    pred = np.zeros_like(y)
    split = (GroupKFold(n_splits=folds) if seed is None
             else GroupKFold(n_splits=folds, shuffle=True, random_state=seed))
    for train, test in split.split(X, y, groups):
        pred[test] = fit(X[train], y[train], groups[train], trainable[train]).predict(X[test])
    return pred


def capture_errors(y, pred, groups, captures, top=10):
    """The captures with the most misclassified flows: (capture, wrong, flows)."""
    wrong, flows = Counter(), Counter()
    for yi, pi, g in zip(y.tolist(), pred.tolist(), groups.tolist()):
        flows[captures[g]] += 1
        wrong[captures[g]] += yi != pi
    return [[c, n, flows[c]] for c, n in wrong.most_common(top)]


def boosted_trees(model, n_features):
    """The ensemble as plain trees: per node feature, integer threshold (features are
    integers, so x <= 442.5 is x <= 442), children (-1 at a leaf) and, at a leaf, the
    raw score it adds to each class."""
    trees = []
    for tree, values in model.trees:
        t = tree.tree_
        leaf = t.children_left < 0
        if np.any(t.feature[~leaf] >= n_features):
            sys.exit("a split on a feature beyond the input vector")
        trees.append({
            "feature": [0 if l else int(f) for f, l in zip(t.feature, leaf)],
            "threshold": [0 if l else int(np.floor(max(th, 0.0)))
                          for th, l in zip(t.threshold, leaf)],
            "left": [-1 if l else int(v) for v, l in zip(t.children_left, leaf)],
            "right": [-1 if l else int(v) for v, l in zip(t.children_right, leaf)],
            "value": [[float(v) for v in values[i]] if l else [0.0] * len(CLASSES)
                      for i, l in enumerate(leaf)],
        })
    return trees, [float(v) for v in model.baseline]


def preorder(tree):
    """Renumber a tree's nodes in depth-first order, left first (children after
    their parent, as the NIC requires); returns the new order of old node ids."""
    order, stack = [], [0]
    while stack:
        i = stack.pop()
        order.append(i)
        if tree["left"][i] >= 0:
            stack.append(tree["right"][i])
            stack.append(tree["left"][i])
    return order


def trees_json(trees, baseline, packets, names):
    """The ensemble as the NIC loads it: per tree the node arrays, a leaf's class scores
    its values in 2^-k steps plus a per-tree shift on every class so none is negative (a
    shift shared by all classes leaves the argmax unchanged); a last one-leaf tree holds
    the baseline. The NIC's argmax of the summed scores is the model's (up to the
    rounding)."""
    spread = [np.ptp(t["value"]) for t in trees] + [max(baseline) - min(baseline)]
    SCORE_SCALE = 1 << min(12, int(np.floor(np.log2(SCORE_MAX / max(spread)))))
    out = []
    for t in trees:
        order = preorder(t)
        new = {old: k for k, old in enumerate(order)}
        q = {i: [int(v) for v in np.rint(np.array(t["value"][i]) * SCORE_SCALE)]
             for i in order if t["left"][i] < 0}
        shift = max(0, -min(min(v) for v in q.values()))
        feature, threshold, left, right, scores = [], [], [], [], []
        for i in order:
            if t["left"][i] < 0:
                row = [v + shift for v in q[i]]
                feature.append(0), threshold.append(0), left.append(-1), right.append(-1)
                scores.append(row)
            else:
                feature.append(t["feature"][i]), threshold.append(t["threshold"][i])
                left.append(new[t["left"][i]]), right.append(new[t["right"][i]])
                scores.append([0] * len(CLASSES))
        if max(max(r) for r in scores) > SCORE_MAX:
            sys.exit("a leaf score does not fit the NIC's 16 bits")
        out.append({"feature": feature, "threshold": threshold, "left": left,
                    "right": right, "scores": scores})
    base = [int(np.rint(b * SCORE_SCALE)) for b in baseline]
    low = min(base)
    out.append({"feature": [0], "threshold": [0], "left": [-1], "right": [-1],
                "scores": [[b - low for b in base]]})
    if max(out[-1]["scores"][0]) > SCORE_MAX:
        sys.exit("the baseline does not fit the NIC's 16 bits")
    return {"packets": packets, "features": names, "trees": out}, SCORE_SCALE


def export_onnx(trees, baseline, packets, names, path):
    """A TreeEnsembleClassifier over the full input vector: softmax of the baseline plus
    each class's summed leaf values; thresholds the same integers as the NIC's."""
    a = {k: [] for k in ("treeids", "nodeids", "featureids", "modes", "values",
                         "truenodeids", "falsenodeids", "ctree", "cnode", "cid", "cw")}
    for tid, t in enumerate(trees):
        for i in range(len(t["left"])):
            leaf = t["left"][i] < 0
            a["treeids"].append(tid)
            a["nodeids"].append(i)
            a["featureids"].append(t["feature"][i])
            a["modes"].append("LEAF" if leaf else "BRANCH_LEQ")
            a["values"].append(float(t["threshold"][i]))
            a["truenodeids"].append(0 if leaf else t["left"][i])
            a["falsenodeids"].append(0 if leaf else t["right"][i])
            if leaf:
                for cls, v in enumerate(t["value"][i]):
                    a["ctree"].append(tid)
                    a["cnode"].append(i)
                    a["cid"].append(cls)
                    a["cw"].append(v)
    node = helper.make_node(
        "TreeEnsembleClassifier", ["features"], ["label", "probabilities"],
        domain="ai.onnx.ml", name="profiler",
        classlabels_int64s=list(range(len(CLASSES))),
        nodes_treeids=a["treeids"], nodes_nodeids=a["nodeids"],
        nodes_featureids=a["featureids"], nodes_modes=a["modes"],
        nodes_values=a["values"], nodes_truenodeids=a["truenodeids"],
        nodes_falsenodeids=a["falsenodeids"],
        class_treeids=a["ctree"], class_nodeids=a["cnode"], class_ids=a["cid"],
        class_weights=a["cw"], base_values=baseline, post_transform="SOFTMAX")
    graph = helper.make_graph(
        [node], "flowshard_profiler",
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [None, len(names)])],
        [helper.make_tensor_value_info("label", onnx.TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT,
                                       [None, len(CLASSES)])])
    onx = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                  helper.make_opsetid("ai.onnx.ml", 3)])
    onx.ir_version = 9
    helper.set_model_props(onx, {
        "flowshard.packets": str(packets),
        "flowshard.features": ",".join(names),
        "flowshard.classes": ",".join(CLASSES),
    })
    onx.producer_name = "flowshard models/train_profiler.py"
    onnx.checker.check_model(onx)
    with open(path, "wb") as f:
        f.write(onx.SerializeToString())


def nic_argmax(trees, x):
    total = np.zeros(len(CLASSES), dtype=np.int64)
    for t in trees:
        i = 0
        while t["left"][i] >= 0:
            i = t["left"][i] if x[t["feature"][i]] <= t["threshold"][i] else t["right"][i]
        total += t["scores"][i]
    return int(np.argmax(total))


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
    metrics = {"validation": {}, "classes": CLASSES, "boosting": BOOSTING,
               "capture_weight_power": CAPTURE_WEIGHT_POWER, "carriers": CARRIERS}
    with tempfile.TemporaryDirectory() as tmp:
        final = None
        for n in sorted(set(VALIDATION_PACKETS + [args.packets])):
            X, y, groups, trainable, names = dataset(args.flowshard, args.data, captures, n,
                                                     tmp)
            check_derived(X, names)
            pred = validate(X, y, groups, trainable, args.folds)
            r = report(y, pred)
            metrics["validation"][str(n)] = r
            print(f"N={n}: by-capture {args.folds}-fold macro-F1 {r['macro_f1']:.3f}, "
                  f"accuracy {r['accuracy']:.3f}", file=sys.stderr)
            if n == args.packets:
                final = (X, y, groups, trainable, names)
                r["captures_with_most_errors"] = capture_errors(y, pred, groups, captures)
                shuffled = [report(y, validate(X, y, groups, trainable, args.folds, seed))
                            for seed in ROBUSTNESS_SEEDS]
                f1s = [s["macro_f1"] for s in shuffled]
                accs = [s["accuracy"] for s in shuffled]
                r["shuffled_splits"] = {"seeds": ROBUSTNESS_SEEDS, "macro_f1": f1s,
                                        "accuracy": accs}
                print(f"N={n}: shuffled by-capture splits: macro-F1 {np.mean(f1s):.3f} "
                      f"± {np.std(f1s):.3f}, accuracy {np.mean(accs):.3f}", file=sys.stderr)
    X, y, groups, trainable, names = final
    metrics["training"] = {
        "captures": len(set(groups.tolist())),
        "flows": int(len(y)),
        "flows_not_trained_on": int((~trainable).sum()),
        "flows_per_class": {CLASSES[k]: v for k, v in sorted(Counter(y.tolist()).items())},
    }
    model = fit(X, y, groups, trainable)
    trees, baseline = boosted_trees(model, len(names))
    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "profiler.onnx")
    trees_path = os.path.join(args.out, "profiler.trees.json")
    export_onnx(trees, baseline, args.packets, names, onnx_path)
    nic, scale = trees_json(trees, baseline, args.packets, names)
    metrics["nic_score_scale"] = scale
    with open(trees_path, "w") as f:
        json.dump(nic, f, separators=(",", ":"))
        f.write("\n")
    metrics["trees"] = len(nic["trees"])
    metrics["leaves"] = sum(1 for t in nic["trees"] for l in t["left"] if l < 0)

    # The exported graph must decide as the trained model does.
    sess = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    label, _ = sess.run(["label", "probabilities"], {"features": X})
    agree = float(np.mean(label == model.predict(X)))
    metrics["onnx_agreement_with_sklearn"] = agree
    if agree < 0.999:
        sys.exit(f"ONNX export disagrees with the trained model on {1 - agree:.2%} of flows")
    # The NIC's integer scores: argmax of the summed leaf scores (a tree walk).
    nic_label = np.array([nic_argmax(nic["trees"], x) for x in X.astype(np.int64)])
    metrics["nic_scores_agreement_with_onnx"] = float(np.mean(nic_label == label))
    print(f"NIC scores agree with ONNX on {metrics['nic_scores_agreement_with_onnx']:.2%} "
          f"of the training flows", file=sys.stderr)
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
    # One thread: the same sums in the same order on every machine, so the same model.
    with threadpool_limits(1):
        main()
