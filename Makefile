# Two commands: `make demo` (set up + the main job) and `make test` (set up + every check).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup test demo regimes lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,lm-eval,search]'
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

test: setup lint
	$(VENV)/bin/pytest

# The main job: build the small benchmark (resumable) and run the paper's study on it.
demo: setup
	$(VENV)/bin/lorafuse study --preset small --out runs/study --seed 0

# Does the regime decide the winner? The small study on each design of the built-in
# library (replay: `small`, experts that forget little; transfer; interference), then
# their claims side by side (runs/regimes/compare.md); not in demo.
regimes: setup
	$(VENV)/bin/lorafuse study --preset small --out runs/study --seed 0
	$(VENV)/bin/lorafuse study --preset small-transfer --out runs/study-transfer --seed 0
	$(VENV)/bin/lorafuse study --preset small-interference --out runs/study-interference --seed 0
	$(VENV)/bin/lorafuse compare runs/study runs/study-transfer runs/study-interference --out runs/regimes

bench: setup
	$(PY) bench/fused_layer.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
