# Two commands from a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup test test-slow test-ops test-browser browser-deps postgres-deps lint demo bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[test,fast,postgres]'
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check .

test: setup lint postgres-deps
	$(BIN)/pytest

# The PostgreSQL store's tests start a real server (initdb + pg_ctl, testkit/postgres.py):
# install Debian's package where neither PATH nor /usr/lib/postgresql/*/bin has initdb.
postgres-deps:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| { apt-get update -qq && apt-get install -y -qq postgresql; }

test-slow: setup browser-deps
	$(BIN)/pytest -m slow

# Operations, against real Prefect servers (about 5 minutes): the work pool of prefect.yaml
# from a fresh copy of the checkout, stream hand-overs, serve stopped by SIGINT/SIGTERM.
test-ops: setup
	$(BIN)/pytest -m "slow or not slow" tests/test_deployments.py tests/test_operations.py

# The Prefect UI of `serve --prefect-port` in headless Chromium (Debian's package; Playwright's
# own browser download is not used). Screenshots go to docs/screenshots/.
test-browser: setup browser-deps
	$(BIN)/pytest -m slow tests/test_browser.py

browser-deps: setup
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }
	@$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/pip install -q playwright

demo: setup
	$(BIN)/profile-relay demo

bench: setup postgres-deps
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/diff.py
	$(BIN)/python bench/dispatch.py
	$(BIN)/python bench/groups.py

clean:
	rm -rf $(VENV) demo-run .pytest_cache .ruff_cache *.egg-info
