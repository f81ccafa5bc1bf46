# The two commands of the README: `make demo` and `make test`.
# Both set up a fresh Debian 12 machine (as root) first: apt packages,
# the venv in .venv, and the guest kernel + initramfs (cached in
# /var/cache/vmcorefs).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: setup test unit integration demo bench soak lint clean

setup:
	./scripts/setup.sh

test: setup
	$(VENV)/bin/mypy
	$(PYTEST) -v tests

unit: setup
	$(PYTEST) -q tests/unit

integration: setup
	$(PYTEST) -v tests/integration

demo: setup
	./scripts/demo.sh

# make bench BENCH_ARGS="--sizes 1,4 --repeat 1" (or --quick); see docs/benchmarks.md.
bench: setup
	@$(PY) -c 'import matplotlib' 2>/dev/null && [ -x $(VENV)/bin/py-spy ] || $(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) bench/run.py $(BENCH_ARGS)

soak: setup
	$(PYTEST) -v -s -m soak -o addopts= tests/integration/test_reliability.py

lint: setup
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache
