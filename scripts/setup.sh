#!/usr/bin/env bash
# Install what building and testing flowshard needs on a fresh Debian machine (run as
# root, or with sudo available), then fetch the real captures the tests replay.
# Idempotent: every step is skipped when its result is already there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
dpkg -s dpkg-dev >/dev/null 2>&1 || need+=(dpkg-dev)     # apt-get source (data fetch)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)  # make model, register-map generator
dpkg -s libpcap-dev >/dev/null 2>&1 || need+=(libpcap-dev)   # nic-sim --live
dpkg -s fonts-dejavu-core >/dev/null 2>&1 || need+=(fonts-dejavu-core)   # simulate --plot OUT.png labels
if ((${#need[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -q
  $sudo apt-get install -y -q "${need[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install a Rust toolchain (1.92 or newer), e.g. Debian's cargo package or rustup" >&2
  exit 1
fi

# The register-map generator (PeakRDL, pinned) in a venv under the cache; `make test`
# uses it to check that hdl-bindings' generated files match rdl/.
venv=${FLOWSHARD_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/flowshard-venv}
reqs="$here/../hdl-bindings/tools/requirements.txt"
if ! cmp -s "$reqs" "$venv/requirements.txt" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$reqs"
  cp "$reqs" "$venv/requirements.txt"
fi

# Real captures (nDPI's test set, training list only) and load series, cached outside the repo.
bash "$here/fetch-data.sh"

# ONNX Runtime for the profiler, taken from the onnxruntime wheel (the version pinned in
# models/requirements.txt): the agent loads it at run time.
D=${FLOWSHARD_DATA:-$HOME/.cache/flowshard-data}
ort_version=$(sed -n 's/^onnxruntime==//p' "$here/../models/requirements.txt")
if [ ! -f "$D/onnxruntime/.version-$ort_version" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary :all: -d "$tmp" "onnxruntime==$ort_version"
  python3 - "$tmp"/onnxruntime-*.whl "$D/onnxruntime" <<'PY'
import os, sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(whl) as z:
    lib = next(n for n in z.namelist() if "/capi/libonnxruntime.so" in n)
    with open(os.path.join(out, "libonnxruntime.so"), "wb") as f:
        f.write(z.read(lib))
PY
  rm -rf "$tmp" "$D"/onnxruntime/.version-*
  touch "$D/onnxruntime/.version-$ort_version"
fi
echo "  onnxruntime $ort_version: $D/onnxruntime/libonnxruntime.so"
