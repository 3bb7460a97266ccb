# flowshard: `make run` simulates a week of real load under each policy, `make test` runs
# every check.
# Both install what they need first (scripts/setup.sh) and are safe to re-run.

DATA ?= $(or $(FLOWSHARD_DATA),$(HOME)/.cache/flowshard-data)
export FLOWSHARD_DATA := $(DATA)
DEMO_PCAP ?= $(DATA)/ndpi/pcap/netflix.pcap
CARGO ?= cargo
VENV ?= $(or $(FLOWSHARD_VENV),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/flowshard-venv)
REGGEN = hdl-bindings/tools/gen.py

.PHONY: replay setup build run test bench model regs regs-check

setup:
	bash scripts/setup.sh

build: setup
	$(CARGO) build --release --locked -p flowshard

# The main job: the embedded default scenario, every policy side by side.
run: build
	./target/release/flowshard simulate --plot target/simulate.svg
	@echo "plot: target/simulate.svg"

# One real capture through the emulated NIC, with its decision log.
replay: build
	./target/release/flowshard replay --pcap $(DEMO_PCAP) --decisions target/decisions.csv
	@echo "decision log: target/decisions.csv"

# Regenerate hdl-bindings' register files from rdl/ (Rust, SystemVerilog, C, docs).
regs:
	$(VENV)/bin/python $(REGGEN)

# Fail when the checked-in generated files differ from what rdl/ gives; skipped (with a
# note) only where the generator is not installed, which `make setup` does.
regs-check:
	@if [ -x $(VENV)/bin/python ]; then $(VENV)/bin/python $(REGGEN) --check; \
	else echo "regs-check: generator not installed in $(VENV) (make setup installs it); skipped"; fi

test: setup regs-check
	cd models && sha256sum -c --quiet profiler.sha256
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	$(CARGO) test --locked --workspace --release

# Rebuild the flow profiler from the training captures: features by `flowshard features`,
# labels from nDPI, by-capture validation, ONNX + NIC tables + card metrics + checksums.
model: build
	test -x $(DATA)/venv/bin/python || python3 -m venv $(DATA)/venv
	$(DATA)/venv/bin/pip install -q -r models/requirements.txt
	$(DATA)/venv/bin/python models/train_profiler.py --flowshard target/release/flowshard \
		--data $(DATA) --captures data/ndpi-train-pcaps.txt --out models
	cd models && sha256sum -c profiler.sha256

bench: build
	./target/release/flowshard bench dataplane --flows 1000000 --packets 10000000 --repeat 5
	./target/release/flowshard bench dataplane --flows 1000000 --packets 10000000 --repeat 5 --zipf 1.1
	./target/release/flowshard bench dataplane --flows 1000000 --packets 10000000 --repeat 5 --zipf 1.1 --two-way
	$(CARGO) bench -p hw-sim --bench dataplane
	./target/release/flowshard bench ring --updates 10000000 --batch 1024
	$(CARGO) bench -p flowshard --bench ring
	$(CARGO) bench -p flowshard --bench profiler
