# shmblock: two commands for a newcomer on a fresh Debian machine with Python 3.11.
#   make run    set everything up, then run the demonstration
#   make test   set everything up, then run lint, type checks and the whole test suite
# Both create .venv themselves; `make test` also installs qemu-utils and nbdkit with apt
# when they are missing (the tests use them as independent judges of qcow2 and NBD), and
# a single-node Ceph (monitor, OSD, manager, RADOS gateway) the S3 repository tests run on.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test lint typecheck bench bench-quick tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/shmblock-run

# Debian packages the tests drive as real peers. Installed only when missing.
tools:
	@missing=""; \
	command -v qemu-img >/dev/null || missing="$$missing qemu-utils"; \
	command -v nbdkit >/dev/null || missing="$$missing nbdkit"; \
	command -v qemu-storage-daemon >/dev/null || missing="$$missing qemu-system-common"; \
	command -v nbdinfo >/dev/null || missing="$$missing libnbd-bin"; \
	command -v fio >/dev/null || missing="$$missing fio"; \
	[ -e /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so ] || missing="$$missing qemu-block-extra"; \
	command -v ceph-mon >/dev/null || missing="$$missing ceph-mon"; \
	command -v ceph-osd >/dev/null || missing="$$missing ceph-osd"; \
	command -v ceph-mgr >/dev/null || missing="$$missing ceph-mgr"; \
	command -v radosgw >/dev/null || missing="$$missing radosgw"; \
	command -v ceph >/dev/null || missing="$$missing ceph-common"; \
	command -v restic >/dev/null || missing="$$missing restic"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  echo "installing:$$missing"; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) tools lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP) tools
	$(BIN)/shmblock-run bench

bench-quick: $(STAMP) tools
	$(BIN)/shmblock-run bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
