# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest proto proto-check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
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

clean:
	rm -rf $(VENV) build *.egg-info
