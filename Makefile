# Two entry points, each creating the virtual environment when it is missing:
#   make demo   - run the whole CapFilt loop on the generated world (pipelines/demo.yaml)
#   make test   - run the test suite
PYTHON ?= python3
VENV ?= .venv
# torch and torchvision must be a matching pair (timm imports torchvision).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.capfilt-installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/capfilt run pipelines/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
