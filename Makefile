# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   -- creates .venv if absent, installs vlmcache, runs extract -> train -> eval -> classify
#   make test   -- the same install, then the test suite (what .ci/run calls)
#
# torch: `pip install torch==2.13.0` finds a CPU build on this project's machines. Elsewhere, to avoid a
# multi-GB CUDA download on a machine without a GPU, run e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlmcache-installed

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# compat: the checkout goes on sys.path through a .pth file. The default editable mode installs an import
	# hook that costs ≈60 ms of every command's start (measured: an argument error 0.53 → 0.46 s).
	$(BIN)/python -m pip install -q -e '.[offline,fast,plots,serve,formats,hf,caption,tensorboard,mlflow,wandb,dev]' \
		--config-settings editable_mode=compat
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlmcache demo

test: $(STAMP)
	$(BIN)/ruff check vlmcache tests benchmarks cli.py
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check vlmcache tests benchmarks cli.py

clean:
	rm -rf $(VENV) build features/demo
