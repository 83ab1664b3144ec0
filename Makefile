# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest proto proto-check bench clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[collector,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy agent collector tests bench scripts

pytest: $(STAMP)
	$(PY) -m pytest

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto \
	  --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  --python_out=proto --pyi_out=proto --grpc_python_out=proto --mypy_grpc_out=proto \
	  proto/exfilwatch/v1/*.proto

bench: $(STAMP)
	$(PY) bench/e2e_latency.py
	$(PY) bench/ingest.py

# Browser tests (tests/web) drive Debian's chromium through Playwright; never `playwright
# install`. As root this installs the package when missing (CI runs as root); otherwise the
# browser tests skip, saying why.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no /usr/bin/chromium and not root: the browser tests will be skipped"; fi

clean:
	rm -rf $(VENV) build *.egg-info
