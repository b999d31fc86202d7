# Two commands on a fresh machine: `make demo` (main job) and `make test` (test suite).
# Both create ./.venv on first use from the lock (requirements.lock); nothing is downloaded at run time, only at
# install time (PyPI). `make lock` regenerates the lock from the loose requirements*.txt, `make upgrade` moves every
# pin to the newest release the loose files allow and runs the tests, `make fresh-check` runs both README commands in
# a fresh clone with an empty pip cache.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
LOCK := requirements.lock
DEPS := $(VENV)/.deps
STAMP := $(VENV)/.installed
BUILD_DEBS := gcc libjpeg62-turbo-dev python3-dev
# The lock is for this interpreter and platform (our CPU machines: Debian 12, CPython 3.11, x86_64).
LOCK_PYTHON := 3.11
LOCK_PLATFORM := x86_64-manylinux_2_28
# Where torch's CPU build comes from, for installing and locking: pip's own sources first (a find-links folder that
# holds it), else PyTorch's CPU index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_LINKS ?= $(firstword $(foreach d,$(shell $(PY) -m pip config get global.find-links 2>/dev/null),\
                     $(if $(wildcard $(d)/torch-*+cpu-*.whl),$(d))) $(TORCH_CPU_INDEX)/torch/)
export HAS_PYTHON_H := import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))

.PHONY: setup system demo test lint format clean lock upgrade fresh-check

setup: $(STAMP)

# Debian packages for the SLURM tests (a throw-away local cluster); only as root with apt, else the tests say why
# they skip.
system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then slurm/local/install.sh; \
	else echo "make system: not root or no apt-get: SLURM tests will be skipped"; fi

# Third-party packages, exactly the lock's versions, in a new venv whenever the lock changes (so nothing from an
# older install survives). The lock has no --no-deps packages; requirements-nodeps.txt pins those (data packages).
$(DEPS): $(LOCK) requirements-nodeps.txt
	@$(PY) -c 'import platform, sys; v = "%d.%d" % sys.version_info[:2]; \
	  v == "$(LOCK_PYTHON)" and platform.machine() == "x86_64" or print( \
	  f"make: WARNING: $(LOCK) is locked for CPython $(LOCK_PYTHON) on x86_64 Linux, this is {v} on {platform.machine()}:" \
	  " pins may not install; use PY=python$(LOCK_PYTHON) or the loose requirements (README, Installing)", file=sys.stderr)'
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q "$$(grep -m1 '^pip==' $(LOCK))"
	@# torch's CPU build from pip's configured sources, else from PyTorch's CPU index
	t="$$(grep -m1 '^torch==' $(LOCK))"; $(VPY) -m pip install -q "$$t" 2>/dev/null \
	  || $(VPY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) "$$t"
	@# DeepSpeed is an sdist: built against the locked setuptools and torch, not in a floating isolated env
	$(VPY) -m pip install -q "$$(grep -m1 '^setuptools==' $(LOCK))"
	DS_BUILD_OPS=0 $(VPY) -m pip install -q --no-build-isolation -r $(LOCK)
	$(VPY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(DEPS)

$(STAMP): $(DEPS) pyproject.toml setup.py albef/data/_jpegcrop.c
	@# the crop-only JPEG decoder (albef/data/_jpegcrop.c) compiles against libjpeg-turbo; without it the install
	@# still works and the loader decodes whole images (slower)
	@if ! { command -v gcc >/dev/null && [ -f /usr/include/jpeglib.h ] && $(PY) -c "$$HAS_PYTHON_H"; }; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q $(BUILD_DEBS) || { apt-get update -q && apt-get install -y -q $(BUILD_DEBS); }; \
	  else echo "make setup: no gcc, libjpeg or Python headers and not root with apt: the crop decoder will not be built"; fi; \
	fi
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

DEMO_ARGS ?=
demo: $(STAMP)
	$(VPY) -m albef.demo $(DEMO_ARGS)

test: $(STAMP) system
	$(VPY) -m pytest tests -q -rs --durations=15

# The linter and the formatter's check (settings in pyproject.toml); `make format` rewrites the files.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Regenerate the lock from requirements.txt + requirements-data-prep.txt + requirements-dev.txt (+ constraints.txt),
# keeping every pin that the loose files still allow; `make upgrade` takes the newest releases instead and runs the tests on them.
# The lock is only rewritten when its text changes (a rewrite rebuilds .venv).
UV_COMPILE = cp $(LOCK) $(LOCK).new && $(VENV)/bin/uv pip compile requirements.txt requirements-data-prep.txt \
  requirements-dev.txt \
  -c constraints.txt --python-version $(LOCK_PYTHON) --python-platform $(LOCK_PLATFORM) \
  --find-links $(TORCH_CPU_LINKS) --custom-compile-command "make lock" -q -o $(LOCK).new
KEEP_LOCK = if cmp -s $(LOCK).new $(LOCK); then rm $(LOCK).new; echo "$(LOCK): unchanged"; \
  else mv $(LOCK).new $(LOCK); echo "$(LOCK): updated"; fi
lock: $(DEPS)
	$(UV_COMPILE)
	@$(KEEP_LOCK)

upgrade: $(DEPS)
	$(UV_COMPILE) --upgrade
	@$(KEEP_LOCK)
	$(MAKE) test
	.ci/opencv_bounds.sh

# Both README commands, as a new user runs them: a clone of HEAD in an empty folder, an empty pip cache.
fresh-check:
	.ci/fresh_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
