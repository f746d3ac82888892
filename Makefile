# One-command setup on a CPU machine. torch is pinned and installed first: a bare `torch` requirement
# would otherwise pull several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: venv test test-all demo lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/constraints.txt
	PIP_CONSTRAINT=$(VENV)/constraints.txt $(PY) -m pip install -q -e ".[dev]"
	# lmms-eval's registry and model API, without its heavy dependencies (torchvision, wandb...), so the tests can
	# check that lmms-eval finds the `qzoom` model; `pip install qzoom-agent[lmms]` installs the whole of it
	$(PY) -m pip install -q --no-deps "lmms-eval==0.7.3" loguru pytz
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

test-all: venv
	$(PY) -m pytest -q -m ""

demo: venv
	$(VENV)/bin/qzoom-agent demo

lint: venv
	$(PY) -m ruff check qzoom_agent tools rl tests benchmarks research examples

bench: venv
	$(PY) benchmarks/bench_core_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
