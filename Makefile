# sur-cache developer targets. TORCH_SPEC pins the CPU wheel for this machine and CI; GPU users override it
# (make install TORCH_SPEC=torch) or install into their own environment with `pip install -e .[dev]`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: install test demo bench bench-extract bench-train lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,demo]"
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/pytest -q

# The demo (README's first command): the whole pipeline on bundled data and tiny models, on the CPU, in minutes.
# scripts/demo.sh echoes each real `sur-cache` command before running it; DEMO_* variables shrink it (tests/test_demo.py).
demo: install
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
	rm -rf $(VENV) demo_out .pytest_cache
