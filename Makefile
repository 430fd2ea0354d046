# Every target sets itself up from a fresh clone: a .venv, torch first and alone, then the package.
# GPU users: make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo demo-decompose test test-fast bench docs setup-test setup-bench setup-docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch goes in alone, before anything that depends on it, so no dependency range can swap it.
$(VENV)/.torch: | $(PY)
	$(PIP) install $(TORCH)
	touch $@

$(VENV)/.extra-%: pyproject.toml decomp/_version.py $(VENV)/.torch
	$(PIP) install -e ".[$*]"
	touch $@

setup-test: $(VENV)/.extra-test
setup-bench: $(VENV)/.extra-bench $(VENV)/.extra-test
# The docs are built from the sources (mkdocstrings reads them statically; nothing imports the
# package), so the docs tools go in alone, without the package and without torch. DOCS_TOOLS is
# pyproject's "docs" extra (tests/test_package.py keeps the two equal).
DOCS_TOOLS := "mkdocs-material" "mkdocstrings[python]" "latex2mathml"
$(VENV)/.docs-tools: pyproject.toml | $(PY)
	$(PIP) install $(DOCS_TOOLS)
	touch $@

setup-docs: $(VENV)/.docs-tools

# The main job: pretrain a CNN with AdamW and DCTProjectedAdam, fine-tune it with AtomParam
# against peft's LoRA (a table, progress bars and demo.png in the current folder).
demo: setup-bench
	$(PY) examples/demo.py

# Every decomposition on every weight of a small trained network.
demo-decompose: setup-bench
	$(PY) examples/decompose.py

test: setup-test
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q -p no:cacheprovider

# The local loop: everything but the tests marked slow (process spawning, huge tensors).
test-fast: setup-test
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q -p no:cacheprovider -m "not slow"

# Every benchmark area; each writes docs/results/<area>.json and renders its section of
# docs/benchmarks.md from it. make bench BENCH_FLAGS=--quick runs each on tiny sizes, writing nothing.
BENCH_FLAGS ?=
bench: setup-bench
	$(PY) benchmarks/decomp_bench.py $(BENCH_FLAGS)
	$(PY) benchmarks/adapters_bench.py $(BENCH_FLAGS)
	$(PY) benchmarks/optim_bench.py $(BENCH_FLAGS)
	$(PY) benchmarks/adapter_files_bench.py $(BENCH_FLAGS)

docs: setup-docs
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis
