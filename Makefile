# Two commands on a fresh machine: `make demo` (main job) and `make test` (test suite).
# Both create ./.venv on first use; nothing is downloaded at run time, only at install time (PyPI).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system demo test clean

setup: $(STAMP)

# Debian packages for the SLURM tests (a throw-away local cluster); only as root with apt, else the tests say why
# they skip.
system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then slurm/local/install.sh; \
	else echo "make system: not root or no apt-get: SLURM tests will be skipped"; fi

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt constraints.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -r requirements.txt -c constraints.txt
	$(VPY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	$(VPY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m albef.demo

test: $(STAMP) system
	$(VPY) -m pytest tests -q

clean:
	rm -rf $(VENV) runs .pytest_cache
