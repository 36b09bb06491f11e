# The two commands a newcomer runs:   make demo   and   make test
# Both create .venv and install the project on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DC := $(VENV)/bin/deepcovid
# The torch/torchvision pair to install first; override for another platform, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

# Demo knobs: CI runs a reduced demo with fewer images and epochs.
DEMO_DIR ?= demo
DEMO_IMAGES ?= 60
DEMO_EPOCHS ?= 3
DEMO_ARCHS ?= --arch resnet18 --arch resnet50 --arch squeezenet1_1 --arch densenet121

.PHONY: install demo test lint bench clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev,openvino]'  # openvino: the int8 tests run too
	touch $@

install: $(VENV)/.installed

# Screens a generated archive end to end on this machine: no broker, no database server (SQLite).
demo: install
	@echo "== 1/4 generating a labelled synthetic training set and an unlabelled archive in $(DEMO_DIR)/"
	DEEPCOVID_DATA_DIR=$(DEMO_DIR)/state $(DC) demo-data $(DEMO_DIR) --images $(DEMO_IMAGES)
	@echo "== 2/4 training a small bundle (random init: no ImageNet download needed)"
	DEEPCOVID_DATA_DIR=$(DEMO_DIR)/state $(DC) train $(DEMO_DIR)/train --out $(DEMO_DIR)/bundle \
		--pretrained none --finetune all --epochs $(DEMO_EPOCHS) --batch-size 20 $(DEMO_ARCHS) \
		--target-sensitivity 0.95
	@echo "== 3/4 registering and promoting the bundle"
	DEEPCOVID_DATA_DIR=$(DEMO_DIR)/state $(DC) bundle register $(DEMO_DIR)/bundle --promote
	@echo "== 4/4 screening the archive (2 files in it are broken on purpose: --allow-failures)"
	DEEPCOVID_DATA_DIR=$(DEMO_DIR)/state $(DC) screen $(DEMO_DIR)/archive --allow-failures

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf $(DEMO_DIR)
