# cellos-probed: `make setup`, `make test`, `make demo` (see README.md)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian packages the daemon and its tests use: libnftables1 is the library
# the PyPI `pip-nftables` binding loads; nftables gives `nft` for tests;
# iproute2 gives `ip` for test set-up; iputils-ping generates test traffic;
# python3-venv lets `make deb` build its virtualenv for Debian's python3;
# gcc and python3-dev (the Python headers) compile the required C extension
# cellos_probed/probes/_fc_sum.c (the metrics summing) at install time;
# prometheus-node-exporter reads the daemon's [metrics] textfile in the tests
# (and is the bench's peer), and prometheus gives `promtool check metrics`
# (where systemd runs, apt also starts their services: disable them if unwanted).
APT_PACKAGES := libnftables1 nftables iproute2 iputils-ping python3-venv gcc python3-dev \
	prometheus-node-exporter prometheus

.PHONY: setup test lint demo clean check-config deb fuzz bench soak

setup: $(VENV)/.installed

# the C extension is compiled by the install: editing its source installs again
$(VENV)/.installed: pyproject.toml setup.py cellos_probed/probes/_fc_sum.c tools/apt-install.sh
	bash tools/apt-install.sh $(APT_PACKAGES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# a per-version build of the extension left by 0.1.0 would load before the abi3 one
	rm -f cellos_probed/probes/_fc_sum.cpython-*.so
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: setup
	$(VENV)/bin/ruff check cellos_probed tests tools testbed fuzz bench
	$(VENV)/bin/mypy

test: setup lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

demo: setup
	$(PY) tools/demo.py

# the Debian package: dist/cellos-probed_<version>_<arch>.deb (see README, "Installing")
deb: setup
	bash packaging/build-deb.sh dist

# the scale benchmark (bench/README.md): BENCH_N=100,500,1000,2000 BENCH_TICKS=30
bench: setup
	bash tools/apt-install.sh prometheus-node-exporter
	$(PY) -m pip install -q matplotlib
	$(PY) bench/bench_daemon.py

# N=1000 for SOAK_SECONDS (default 600): RSS must stay flat
SOAK_SECONDS ?= 600
soak: setup
	$(PY) bench/bench_daemon.py --soak $(SOAK_SECONDS)

# coverage-guided fuzzing of every parser (not run by CI): FUZZ_SECONDS per target
FUZZ_SECONDS ?= 600
fuzz: setup
	$(PY) -m pip install -q atheris
	mkdir -p fuzz/logs
	set -e; for target in $$($(PY) fuzz/targets.py --list); do \
	  echo "fuzz: $$target for $(FUZZ_SECONDS)s"; \
	  mkdir -p fuzz/corpus/$$target; \
	  $(PY) fuzz/targets.py $$target fuzz/corpus/$$target $$(ls -d fuzz/seeds/$$target 2>/dev/null) \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    > fuzz/logs/$$target.log 2>&1 || { tail -30 fuzz/logs/$$target.log; exit 1; }; \
	  grep -E "^Done|stat::number_of_executed_units" fuzz/logs/$$target.log | tr '\n' ' '; echo; \
	done

check-config: setup
	$(VENV)/bin/cellos-probed check-config --config config/cellos-probed.toml

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache dist build
