# citycard: `make demo` and `make test` install what they need, then run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The independent gRPC client (Node's @grpc/grpc-js) that the tests run: its npm packages, pinned by the lock file.
NODE_CLIENT := examples/node-client
NODE_STAMP  := $(NODE_CLIENT)/node_modules/.installed
DATA   ?= var
# The unary load generator of benches/grpc.py in gRPC's C++ library (Debian's libgrpc++-dev): built, git-ignored.
CXX_LOAD := benches/grpc_unary_load

.PHONY: demo test bench bench-tools lint typecheck compile debug clean install system-deps proto

demo: $(STAMP)
	$(BIN)/citycard demo --data $(DATA)

test: $(STAMP) $(NODE_STAMP) $(CXX_LOAD)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benches.ledger --json

install: $(STAMP)

bench-tools: $(CXX_LOAD)

$(CXX_LOAD): benches/grpc_unary_load.cc | system-deps
	$(CXX) -O2 -std=c++17 -Wall -o $@ $< $$(pkg-config --cflags --libs grpc++)

system-deps:
	@scripts/install-system-deps

$(STAMP): pyproject.toml setup.py core/_ledger.pyx core/_ledger.pxd core/lmdb_api.pxd card/_des.pyx card/_des.pxd card/_purchase.pyx card/_purchase.pxd apps/bus/_tac.pyx apps/bus/_tac.pxd citycard/server/_h2.pyx $(wildcard proto/citycard/v1/*.proto) | system-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel cython numpy grpcio-tools
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test]'
	@touch $(STAMP)

$(NODE_STAMP): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json | system-deps
	npm ci --prefix $(NODE_CLIENT) --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

# Regenerate the gRPC API's Python code (citycard/v1/, git-ignored, do-not-edit) from proto/.
proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --force

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
	rm -rf build *.egg-info core/*.so core/_ledger.c core/*.html card/*.so card/_des.c card/_purchase.c card/*.html apps/bus/*.so apps/bus/_tac.c apps/bus/*.html citycard/server/*.so citycard/server/_h2.c citycard/server/*.html $(VENV) citycard/v1 $(NODE_CLIENT)/node_modules $(CXX_LOAD)
