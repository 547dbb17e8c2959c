# Two entry points, each creating the virtual environment when it is missing:
#   make demo   - run the whole CapFilt loop on the generated world (pipelines/demo.yaml)
#   make test   - lint (ruff) and run the test suite
#   make paper  - BLIP's ablations on the generated world, one table (pipelines/paper.yaml; about an hour)
PYTHON ?= python3
VENV ?= .venv
# torch and torchvision must be a matching pair (timm imports torchvision).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
# Two pytest processes: on this 2-core machine the suite took 27 min 45 s in two, 32 min 21 s in one
# (2026-12-02, early); the slow tests are mostly process start-ups (Ray clusters, Ray Train worker groups,
# imports), which overlap a little. Each process takes whole test files (loadfile), so a module's
# fixtures (the reduced demo run, the multi-node cluster) are built once. Since the tests that are not
# about Ray Train's workers train in the driver (train_in_driver), 20 min 35 s against 30 min 43 s the
# same day.
TEST_WORKERS ?= 2
STAMP := $(VENV)/.capfilt-installed
TEST_STAMP := $(VENV)/.capfilt-test-installed

# The report test (tests/reporting) opens the HTML in headless Chromium; test-tools installs it when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo paper test test-tools venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	touch $(STAMP)

# The test tools (pytest, moto, ruff, the export consumers' readers) only where the tests run: the demo's
# set-up does without them (about 20 s of a fresh clone's `make demo` here).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/capfilt run pipelines/demo.yaml

# The demo's stages are the both_nucleus row's: a finished runs/demo is reused, not redone.
paper: $(STAMP)
	$(VENV)/bin/capfilt compare pipelines/paper.yaml --reuse-stages-from runs/demo

test: $(TEST_STAMP) test-tools
	$(VENV)/bin/ruff check capfilt tests bench
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-tools:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || ($(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	  || { echo "make test: the report test needs Chromium; install it (Debian/Ubuntu: apt-get install chromium)" >&2; exit 1; }

clean:
	rm -rf $(VENV) runs
