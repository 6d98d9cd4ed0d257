# make demo: set up .venv, boot a guest, then compare the MMU modes on the
# sample suite (tables, and the plot in compare.png). make test: the whole suite.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test fuzz bench kut clean

$(STAMP): pyproject.toml setup.py hv/hw/_sites.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hv run hello
	$(BIN)/hv compare --plot compare.png

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The property-based fuzzers of tests/test_fuzz.py with a larger budget and
# fresh random seeds (make test runs a small derandomized set).
HV_FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	HV_FUZZ_EXAMPLES=$(HV_FUZZ_EXAMPLES) HV_FUZZ_RANDOM=1 $(BIN)/python -m pytest -q tests/test_fuzz.py

bench: $(STAMP)
	$(BIN)/python bench/bench.py

# KVM's kvm-unit-tests (../shared/kvm-unit-tests: prebuilt images and the
# source's x86/unittests.cfg) in every mode: PASS, FAIL or SKIP each, JOBS at
# once; access (hours in each mode) without a timeout.
JOBS ?= $(shell nproc)
kut: $(STAMP)
	$(BIN)/hv kut ../shared/kvm-unit-tests --mmu native,shadow,ept,agile,qemu --jobs $(JOBS) \
		--timeout access=0

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache compare.png
