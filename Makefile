# The two commands of the README. Both create .venv (if missing) and install the pinned set-up
# from requirements.txt; `make test` also installs Debian's chromium for the browser tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# JupyterLab refuses to start as root (Docker, cloud VMs, workshop images) unless told it may.
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
LAB_PORT ?= 8888
LAB_DIR ?= labs
# JupyterLab defaults for the labs (labs/_jupyter/labconfig/default_setting_overrides.json), ahead of any
# JUPYTER_CONFIG_PATH of the user's: warn when Run All is clicked while the kernel is still starting
# (JupyterLab otherwise skips every cell without a word; docs/facilitator_guide.md, Troubleshooting).
LAB_CONFIG_PATH := $(abspath labs/_jupyter)$(if $(JUPYTER_CONFIG_PATH),:$(JUPYTER_CONFIG_PATH))
# JIT-built C++ ops (DeepSpeed's CPU Adam, shm comm) live in this environment, not in a shared ~/.cache.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: lab test setup doctor chromium clean reset-runs

# pip byte-compiles the ~17,000 installed .py files one after another (~90 s of one core: transformers'
# 2,681 files took 14.8 s, 2026-12-01); compileall writes the same .pyc files on every core. A file that does
# not compile (a package's Python-2 test data) is skipped, as pip skips it.
$(STAMP): requirements.txt pyproject.toml
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -r requirements.txt
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib >/dev/null || true
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

lab: $(STAMP)
	JUPYTER_CONFIG_PATH=$(LAB_CONFIG_PATH) $(BIN)/jupyter lab --ip=127.0.0.1 --port=$(LAB_PORT) --no-browser --notebook-dir=$(LAB_DIR) $(ROOT_FLAG) $(LAB_ARGS)

# The first-run check: compiler, DeepSpeed's CPU ops built once, offline assets, what to tell the room.
doctor: $(STAMP)
	$(BIN)/shardlab doctor

# Empty the run store the labs and the app write to (labs/runs and ./runs).
reset-runs:
	rm -rf runs labs/runs

test: $(STAMP) chromium
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q --durations=30

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
