# gpt2-finetune: every stage is a make target. RECIPE=path/to/recipe.yaml selects the run.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
RECIPE ?= recipes/demo-tune.yaml
ARGS ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test prepare eval
NPROC ?= 1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest tests $(ARGS)

prepare: setup
	$(PY) -m finetune prepare $(RECIPE) $(ARGS)

eval: setup
ifeq ($(NPROC),1)
	$(PY) -m finetune eval $(RECIPE) $(ARGS)
else
	$(PY) -m finetune prepare $(RECIPE)
	$(VENV)/bin/accelerate launch --multi_gpu --num_processes $(NPROC) -m finetune eval $(RECIPE) $(ARGS)
endif
