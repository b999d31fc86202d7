# Two commands on a fresh machine: `make demo` (main job) and `make test` (test suite).
# Both create ./.venv on first use; nothing is downloaded at run time, only at install time (PyPI).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD_DEBS := gcc libjpeg62-turbo-dev python3-dev
export HAS_PYTHON_H := import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))

.PHONY: setup system demo test clean

setup: $(STAMP)

# Debian packages for the SLURM tests (a throw-away local cluster); only as root with apt, else the tests say why
# they skip.
system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then slurm/local/install.sh; \
	else echo "make system: not root or no apt-get: SLURM tests will be skipped"; fi

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt constraints.txt pyproject.toml setup.py \
          albef/data/_jpegcrop.c
	@# the crop-only JPEG decoder (albef/data/_jpegcrop.c) compiles against libjpeg-turbo; without it the install
	@# still works and the loader decodes whole images (slower)
	@if ! { command -v gcc >/dev/null && [ -f /usr/include/jpeglib.h ] && $(PY) -c "$$HAS_PYTHON_H"; }; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q $(BUILD_DEBS) || { apt-get update -q && apt-get install -y -q $(BUILD_DEBS); }; \
	  else echo "make setup: no gcc, libjpeg or Python headers and not root with apt: the crop decoder will not be built"; fi; \
	fi
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
	$(VPY) -m pytest tests -q --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache
