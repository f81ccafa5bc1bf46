# The two commands of the README: `make demo` and `make test`.
# Both set up a fresh Debian 12 machine (as root) first: apt packages,
# the venv in .venv, and the guest kernel + initramfs (cached in
# /var/cache/vmcorefs).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: setup test unit integration demo bench soak lint clean sanitize fuzz fuzz-replay

setup:
	./scripts/setup.sh

test: setup sanitize fuzz-replay
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

# The native read path and dump copier (src/vmcorefs/_readpath.c) under ASan+UBSan: their unit tests
# against a sanitized build kept in build/sanitize (never over the installed one);
# any sanitizer report fails.  `make fuzz` runs its libFuzzer harness for
# FUZZ_TIME seconds and merges new coverage into tests/fuzz/corpus, which
# `make fuzz-replay` (part of `make test`) runs once.
SAN_DIR   := build/sanitize/vmcorefs
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1
FUZZ_BIN  := build/fuzz/fuzz_readpath
FUZZ_TIME ?= 300

sanitize: setup
	mkdir -p $(SAN_DIR)
	gcc -shared -fPIC -std=gnu11 -Wall $(SAN_FLAGS) -I$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])') \
	  src/vmcorefs/_readpath.c -o $(SAN_DIR)/_readpath$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 VMCOREFS_READPATH_BUILD=$(abspath $(SAN_DIR)) \
	  $(PYTEST) -q -s -p no:cacheprovider tests/unit/test_readpath_engine.py tests/unit/test_dump_engine.py > build/sanitize/log 2>&1; \
	  rc=$$?; cat build/sanitize/log; [ $$rc -eq 0 ] && ! grep -Eq 'Sanitizer|runtime error:' build/sanitize/log

$(FUZZ_BIN): tests/fuzz/fuzz_readpath.c src/vmcorefs/_readpath.c
	mkdir -p $(@D)
	clang -std=gnu11 -Wall $(SAN_FLAGS) -fsanitize=fuzzer tests/fuzz/fuzz_readpath.c -o $@ -lpthread

fuzz-replay: setup $(FUZZ_BIN)
	$(FUZZ_BIN) -runs=0 tests/fuzz/corpus

fuzz: setup $(FUZZ_BIN)
	mkdir -p build/fuzz/corpus
	$(FUZZ_BIN) -max_total_time=$(FUZZ_TIME) -print_final_stats=1 build/fuzz/corpus tests/fuzz/corpus
	$(FUZZ_BIN) -merge=1 tests/fuzz/corpus build/fuzz/corpus

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache
