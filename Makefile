# Every target works alone on a fresh clone: it creates .venv if missing.
# torch is installed FIRST and pinned (a CPU build by default) so that nothing later
# pulls a multi-GB CUDA build; override with e.g. `make test TORCH=torch==2.6.0`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cm3leon-installed
# `make demo` needs only the package and its evaluation extra: half the install of `setup`
DEMO_STAMP := $(VENV)/.cm3leon-demo-installed

# `make serve` serves this model directory (the demo's instruction-tuned model).
MODEL  ?= runs/demo/sft
HOST   ?= 127.0.0.1
PORT   ?= 7860
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test demo demo-quick baselines bench serve browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,ui,baselines]"
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit('torchvision must not be installed (it breaks the CPU torch build)' if u.find_spec('torchvision') else 0)"
	touch $(DEMO_STAMP) $@

$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[eval]"
	touch $@

setup: $(STAMP)

# The browser tests drive Debian's chromium with Playwright (never Playwright's own download).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; } || \
	  echo "warning: could not install chromium; tests/test_serve.py needs it (and fails without it under CI=true)" >&2

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

demo: $(DEMO_STAMP)
	$(BIN)/cm3leon demo --out runs/demo

demo-quick: $(DEMO_STAMP)
	$(BIN)/cm3leon demo --out runs/demo-quick --quick

# CM3Leon against a DALL-E-style and a latent-diffusion model at the same training FLOPs and
# wall time, on the demo run (the [baselines] extra comes with setup).
baselines: $(STAMP)
	@test -f runs/demo/tokenize/meta.json || { echo "make baselines: no runs/demo; run 'make demo' first" >&2; exit 2; }
	$(BIN)/cm3leon ablate --run runs/demo --baselines

serve: $(STAMP)
	@test -f $(MODEL)/model.safetensors || { echo "make serve: no model in $(MODEL); run 'make demo' first (or MODEL=DIR)" >&2; exit 2; }
	$(BIN)/cm3leon serve --model $(MODEL) --host $(HOST) --port $(PORT)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache
