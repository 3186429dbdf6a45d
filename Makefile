# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the project's metadata changes.
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test lint typecheck pytest fuzz bench profile clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(STAMP_RUN)

# Flags go through ARGS (make run ARGS="--listen 127.0.0.1:3129"); PROXY_* variables work too.
run: $(STAMP_RUN)
	$(BIN)/tracing-proxy $(ARGS)

test: lint typecheck pytest

lint: $(STAMP_TEST)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP_TEST)
	$(BIN)/mypy

# Node clients for tests/test_node_clients.py, from tests/node/package-lock.json, kept there.
NODE_STAMP := tests/node/node_modules/.installed
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix tests/node --no-audit --no-fund --silent && touch $@; \
	else echo "npm not found: the Node client tests skip (and fail under CI=true)"; fi

pytest: $(STAMP_TEST) $(NODE_STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The property tests with a large example budget (20,000 per property unless FUZZ_EXAMPLES
# says otherwise); failing cases are kept in .hypothesis/ and replayed first next time.
fuzz: $(STAMP_TEST)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q tests/test_oracle_requests.py \
		tests/test_oracle_responses.py tests/test_oracle_reuse.py tests/test_oracle_ids.py \
		$(PYTEST_ARGS)

bench: $(STAMP_TEST)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk; } \
		|| { echo "make bench needs wrk: apt-get install wrk"; exit 1; }
	@command -v h2load >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq nghttp2-client; } \
		|| { echo "make bench needs h2load: apt-get install nghttp2-client"; exit 1; }
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# ours under load, sampled by py-spy: .bench/profile-ours.speedscope.json
profile: $(STAMP_TEST)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk; } \
		|| { echo "make profile needs wrk: apt-get install wrk"; exit 1; }
	$(BIN)/python -m benchmarks.profile $(PROFILE_ARGS)

clean:
	rm -rf $(VENV) .bench .mypy_cache .pytest_cache .ruff_cache tests/node/node_modules
