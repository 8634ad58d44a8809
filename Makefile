# Two commands: `make run` starts the proxy (filesystem backend), `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export PROXY_MODE ?= transparent
export STORAGE_BACKEND ?= fs
export FS_ROOT ?= $(CURDIR)/.cache/oci
export LISTEN_ADDR ?= 127.0.0.1:8080

.PHONY: run run-s3 test lint bench bench-quick clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,dev]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/gunicorn -c gunicorn.conf.py wsgi:app

# SeaweedFS on 127.0.0.1:8333 and the proxy with STORAGE_BACKEND=s3; Ctrl-C stops both.
run-s3: $(STAMP)
	VENV=$(VENV) scripts/run-s3.sh

# The Debian packages first (installed when root, else the command that would), then the venv.
test:
	scripts/install-test-deps.sh
	$(MAKE) --no-print-directory $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy app
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) bench/bench.py

bench-quick: $(STAMP)
	$(PY) bench/bench.py --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache
