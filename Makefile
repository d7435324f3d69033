# Every target works alone on a fresh clone: it creates .venv if missing.
# torch is installed FIRST and pinned (a CPU build by default) so that nothing later
# pulls a multi-GB CUDA build; override with e.g. `make test TORCH=torch==2.6.0`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cm3leon-installed

.PHONY: setup test demo demo-quick bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit('torchvision must not be installed (it breaks the CPU torch build)' if u.find_spec('torchvision') else 0)"
	touch $@

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/cm3leon demo --out runs/demo

demo-quick: $(STAMP)
	$(BIN)/cm3leon demo --out runs/demo-quick --quick

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache
