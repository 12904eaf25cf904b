# Everything a fresh machine needs, then the tests or the demo.
#   make test   - install, build the local control plane and the device plugin's config
#                 parser (cached), lint, run every test
#   make demo   - the local GPU cluster plus a JupyterHub using GPUShareSpawner
PYTHON ?= python3
VENV ?= .venv
CACHE ?= $(HOME)/.cache/jupyterhub-gpushare
CHP_VERSION ?= 4.6.3
export GPUSHARE_CACHE := $(CACHE)

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CHP := $(CACHE)/node/node_modules/.bin/configurable-http-proxy

.PHONY: deps test test-jh5 lint docs demo bench screenshots clean-cache

CHROMIUM ?= /usr/bin/chromium
export GPUSHARE_CHROMIUM := $(CHROMIUM)

deps: $(STAMP) $(CHP) control-plane plugin-config $(CHROMIUM)

# Debian's Chromium for the browser tests; Playwright never downloads a browser.
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "make: $(CHROMIUM) is missing: install Chromium from your distribution (or set CHROMIUM=/path/to/chromium)"; exit 1; }
	@[ "$$(id -u)" = 0 ] || { echo "make: $(CHROMIUM) is missing: run 'apt-get install -y chromium' as root"; exit 1; }
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core

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
	@bash jupyterhub_gpushare/testing/build-control-plane.sh >/dev/null

# The NVIDIA device plugin's own config parser, in a small Go program of ours
# (tests read device plugin configs with it; cached by plugin version).
.PHONY: plugin-config
plugin-config:
	@bash jupyterhub_gpushare/testing/build-plugin-config.sh >/dev/null

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: deps lint docs
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-jh5

# z2jh ships JupyterHub 5.5: the tests that talk to the hub run on it too.
JH5_VENV ?= .venv-jh5
JH5_STAMP := $(JH5_VENV)/.installed-stamp
$(JH5_STAMP): pyproject.toml
	$(PYTHON) -m venv $(JH5_VENV)
	$(JH5_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(JH5_VENV)/bin/python -m pip install --quiet -e ".[test]" "jupyterhub==5.5.0"
	touch $@

test-jh5: deps $(JH5_STAMP)
	$(JH5_VENV)/bin/python -m pytest -p no:cacheprovider tests/test_hub.py tests/test_spawner.py \
		tests/test_queue_edges.py tests/test_pages.py tests/test_config.py tests/test_class.py \
		tests/test_start_timeout.py tests/test_reclaim_config.py

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

demo: deps
	$(BIN)/python -m jupyterhub_gpushare.testing.demo

screenshots: deps
	GPUSHARE_SCREENSHOTS=docs/_static/screenshots $(BIN)/python -m pytest tests/test_pages.py

bench: deps
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean-cache:
	rm -rf $(CACHE)
