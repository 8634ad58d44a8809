# Two commands: `make run` starts the proxy (filesystem backend), `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export PROXY_MODE ?= transparent
export STORAGE_BACKEND ?= fs
export FS_ROOT ?= $(CURDIR)/.cache/oci
export LISTEN_ADDR ?= 127.0.0.1:8080

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,dev]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/gunicorn -c gunicorn.conf.py wsgi:app

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache
