# Pathway Explorer: `make demo` (set up, extract, load, serve) and `make test` (the whole suite).
# Both install what is missing from this repository's own files and are quick when nothing changed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
export PATHX_HOME ?= $(CURDIR)/.cache
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install debian neo4j demo test lint bench clean stop

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[demo,test]"
	rm -f $(VENV)/.installed-*
	touch $@

# Debian's packages: Chromium for the browser tests (never a browser download), docker-compose to lint
# docker/compose.yml where no `docker compose` plugin exists, and Fashion-MNIST's 70,000 images (the demo's data).
debian:
	@command -v chromium >/dev/null 2>&1 && [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] \
	  && { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; } \
	  || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium docker-compose \
	       dataset-fashion-mnist >/dev/null; }

# Neo4j 5.26 jars from Maven Central into $(PATHX_HOME)/neo4j/lib (once).
neo4j: install
	$(BIN)/pathx db fetch >/dev/null

demo: install debian neo4j
	$(BIN)/pathx demo

# ruff, and mypy (strict on records/, extractor/, graphstore/; the rest checked too: pyproject.toml [tool.mypy])
lint: install
	$(BIN)/ruff check records extractor graphstore ui pathx tests bench
	$(BIN)/mypy

test: install debian neo4j lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=20

# Speed and memory figures (not part of `make test`): bench/results/{results.json,README.md}.
bench: install debian neo4j
	$(BIN)/python bench/run.py

stop:
	-$(BIN)/pathx db stop

clean: stop
	rm -rf $(VENV) .cache runs test-artifacts .mypy_cache
