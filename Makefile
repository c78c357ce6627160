# One entry point for humans and CI. Every target sets up what it needs, so a
# fresh Debian/Ubuntu machine only needs python3 (with venv) and make.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Debian packages the tests use as interop oracles or real parts.
APT_PKGS := openssl zstd libubootenv-tool grub-common fdisk dosfstools e2fsprogs \
            swtpm swtpm-tools libtss2-dev pkg-config u-boot-tools mtools systemd prometheus \
            chromium chromium-driver postgresql
EXTRAS  ?= test,host,controller,postgres,tpm,telemetry,udev
# make image / make e2e (image/README.md): the board, where images go, the cache outside the clone
BOARD   ?= x86-64-grub
IMAGE_OUT ?= build/image/$(BOARD)
EDGEOPS_CACHE ?= /var/cache/edgeops
E2E_OUT ?= build/e2e

.PHONY: help venv sysdeps test test-fast lint demo demo-fleet bench bench-controller bench-models bench-idle bench-startup bench-dashboard bench-fleet clean image e2e image-check

help:
	@echo "make demo    - narrated A/B update life cycle on a simulated board"
	@echo "make demo-fleet - a controller on loopback rolls a release to 5 sim boards; one reverts"
	@echo "make test    - the whole test suite (sets up .venv and system packages)"
	@echo "make lint    - ruff, mypy --strict and the import-layer contracts"
	@echo "make bench   - install benchmarks against the machine's limit and RAUC"
	@echo "make image   - a bootable A/B disk image for BOARD (x86-64-grub) from Debian packages"
	@echo "make e2e     - the image booted in QEMU: updates from a controller on 127.0.0.1"
	@echo "make e2e BOARD=uboot-arm64 - the arm64 image booted in QEMU virt with U-Boot (smoke)"
	@echo "make image-check BOARD=rpi4 - a Raspberry Pi image checked structurally"

$(STAMP): setup.cfg pyproject.toml | sysdeps
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(STAMP)

# Installs only what is missing, and only when we may (root); otherwise the
# tests that need a missing tool skip with a message naming the package.
sysdeps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "apt-get install:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "not root: missing Debian packages:$$missing (tests needing them will skip)"; fi; \
	fi

test: sysdeps venv
	$(BIN)/pytest

test-fast: venv
	$(BIN)/pytest -x -m 'not slow'

lint: venv
	$(BIN)/ruff check agent tests tools
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

demo: sysdeps venv
	$(BIN)/python tools/demo.py

demo-fleet: venv
	$(BIN)/python tools/demo_fleet.py

bench-controller: venv
	$(BIN)/python tools/bench/controller.py

bench-fleet: venv
	$(BIN)/python tools/bench/fleet.py

bench-models: venv
	$(BIN)/python tools/bench/model_swap.py

bench-idle: venv
	$(BIN)/python tools/bench/idle.py

bench-dashboard: sysdeps venv
	$(BIN)/python tools/bench/dashboard.py

bench-startup: venv
	$(BIN)/python tools/bench/startup.py

# needs the corpus: ../shared/anchors/delta/run.sh, then tools/bench/delta_v3.sh (D=/tmp/delta)
bench-delta: venv
	$(BIN)/python tools/bench/delta.py

bench-telemetry: venv
	$(BIN)/python tools/bench/telemetry.py

bench: sysdeps venv
	$(BIN)/python tools/bench/install.py

image: venv
	EDGEOPS_CACHE=$(EDGEOPS_CACHE) $(PY) image/build.py --board $(BOARD) --out $(IMAGE_OUT)

ifeq ($(BOARD),uboot-arm64)
# the arm64 smoke boot (QEMU virt, Debian's U-Boot): not in make test or .ci/run (minutes per boot)
e2e: venv
	EDGEOPS_CACHE=$(EDGEOPS_CACHE) $(BIN)/python tools/e2e/arm64.py --out build/e2e-arm64 --fallback
else
e2e: venv
	EDGEOPS_CACHE=$(EDGEOPS_CACHE) $(PY) tools/e2e/run.py --out $(E2E_OUT) $(if $(SCENARIOS),--only $(SCENARIOS)) $(if $(E2E_SMP),--smp $(E2E_SMP))
endif

# the Raspberry Pi images checked structurally (they cannot boot here): make image BOARD=rpi4 first
image-check: venv
	$(BIN)/python tools/e2e/rpi_check.py --board $(BOARD) --image $(IMAGE_OUT)/disk.img

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
