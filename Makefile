# sur-cache developer targets. TORCH_SPEC pins the CPU wheel for this machine and CI; GPU users override it
# (make install TORCH_SPEC=torch) or install into their own environment with `pip install -e .[dev]`.
# CONSTRAINTS pins every other package to the set CI last passed with (constraints/ci.txt), so a registry release
# cannot break a green main overnight; `make install CONSTRAINTS=` installs the newest versions pyproject allows.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints/ci.txt
BIN := $(VENV)/bin
LATEST_VENV := .venv-latest
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-latest freeze demo bench bench-extract bench-train lint clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,demo]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/pytest -q

# The suite against the newest releases pyproject allows, in a venv of its own: finds dependency drift on purpose.
# When it passes, `make freeze` records that set as the new CI pins.
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) install VENV=$(LATEST_VENV) CONSTRAINTS=
	$(LATEST_VENV)/bin/pip list --format=freeze | grep -i -E '^(torch|transformers|diffusers|accelerate|zarr|numpy)=='
	$(LATEST_VENV)/bin/pytest -q

freeze:
	{ echo "# What CI installs: a pip freeze of a passing environment ($$($(BIN)/python -V), $$(date +%F)), torch left to TORCH_SPEC."; \
	  echo "# Regenerate after a green \`make test-latest\`: make freeze VENV=$(LATEST_VENV). Users install from pyproject's ranges."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -i '^torch=='; } > constraints/ci.txt

# The demo (README's first command): the whole pipeline on bundled data and tiny models, on the CPU, in minutes.
# scripts/demo.sh echoes each real `sur-cache` command before running it; DEMO_* variables shrink it (tests/test_demo.py).
# demo_out is the demo's own folder (never a user's: DEMO_OUT moves it), so a second `make demo` starts it afresh.
demo: install
	$(if $(DEMO_OUT),,rm -rf demo_out)
	SUR_CACHE=$(BIN)/sur-cache bash scripts/demo.sh

# Benchmarks, not tests: each prints a table and upserts CSV rows under bench/results/ (named after the device).
# Without a GPU, `bench` runs the Triton interpreter's correctness check at a small size instead.
bench: install
	$(BIN)/python bench/bench_attention.py

bench-extract: install
	$(BIN)/python bench/bench_extract.py

bench-train: install
	$(BIN)/python bench/bench_loader.py
	$(BIN)/python bench/bench_train.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(LATEST_VENV) demo_out .pytest_cache
