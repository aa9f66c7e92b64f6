# citycard: `make demo` and `make test` install what they need, then run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= var

.PHONY: demo test bench lint typecheck compile debug clean install system-deps

demo: $(STAMP)
	$(BIN)/citycard demo --data $(DATA)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benches.ledger --json

install: $(STAMP)

system-deps:
	@scripts/install-system-deps

$(STAMP): pyproject.toml setup.py core/_ledger.pyx core/_ledger.pxd core/lmdb_api.pxd | system-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel cython numpy
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test]'
	@touch $(STAMP)

# Rebuild the compiled core in place after editing .pyx/.pxd.
compile: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

debug: $(STAMP)
	CITYCARD_DEBUG=1 $(BIN)/python setup.py -q build_ext --inplace --force

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff && $(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/python -m pip install -q mypy && $(BIN)/mypy core citycard

clean:
	rm -rf build *.egg-info core/*.so core/_ledger.c core/*.html $(VENV)
