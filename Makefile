# Everything a fresh machine needs, then the tests or the demo.
#   make test   - install, build the local control plane (cached), lint, run every test
#   make demo   - the local GPU cluster plus a JupyterHub using GPUShareSpawner
PYTHON ?= python3
VENV ?= .venv
CACHE ?= $(HOME)/.cache/jupyterhub-gpushare
CHP_VERSION ?= 4.6.3
export GPUSHARE_CACHE := $(CACHE)

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CHP := $(CACHE)/node/node_modules/.bin/configurable-http-proxy

.PHONY: deps test lint docs demo bench clean-cache

deps: $(STAMP) $(CHP) control-plane

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) is missing: install Python >= 3.10"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	touch $@

$(CHP):
	@command -v npm >/dev/null || { echo "make: npm is missing: install Node.js (apt-get install nodejs npm)"; exit 1; }
	npm install --silent --no-fund --no-audit --prefix $(CACHE)/node configurable-http-proxy@$(CHP_VERSION)

.PHONY: control-plane
control-plane:
	@bash hack/build-control-plane.sh >/dev/null

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: deps lint docs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

demo: deps
	$(BIN)/python -m tests.localcluster.demo

clean-cache:
	rm -rf $(CACHE)
