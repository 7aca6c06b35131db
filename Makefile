# gpt2-finetune: every stage is a make target. RECIPE=path/to/recipe.yaml selects the run.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
RECIPE ?= recipes/demo-tune.yaml
ARGS ?=
OFFLINE := HF_HUB_OFFLINE=1

.PHONY: setup test prepare train eval demo bench generate chat serve merge push
NPROC ?= 1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(OFFLINE) $(PY) -m pytest tests $(ARGS)

prepare: setup
	$(PY) -m finetune prepare $(RECIPE) $(ARGS)

# NPROC>1: prepare once here, then `accelerate launch` (ranks only check the prepared data is current).
# ACCELERATE_CONFIG=recipes/accelerate/{ddp,fsdp,deepspeed-zero2}.yaml picks a GPU setup; without it,
# --multi_gpu (on a machine without CUDA the ranks run as gloo CPU processes).
ACCELERATE_CONFIG ?=
train: setup
ifeq ($(NPROC),1)
	$(PY) -m finetune train $(RECIPE) $(ARGS)
else
	$(PY) -m finetune prepare $(RECIPE) $(ARGS)
	$(VENV)/bin/accelerate launch $(if $(ACCELERATE_CONFIG),--config_file $(ACCELERATE_CONFIG),--multi_gpu) \
		--num_processes $(NPROC) -m finetune train $(RECIPE) $(ARGS)
endif

# eval: ARGS takes recipe overrides and --model FOLDER (default: the run's final/); NPROC as for train.
eval: setup
ifeq ($(NPROC),1)
	$(PY) -m finetune eval $(RECIPE) $(ARGS)
else
	$(PY) -m finetune prepare $(RECIPE) $(filter-out --%,$(foreach a,$(ARGS),$(if $(findstring =,$(a)),$(a))))
	$(VENV)/bin/accelerate launch $(if $(ACCELERATE_CONFIG),--config_file $(ACCELERATE_CONFIG),--multi_gpu) \
		--num_processes $(NPROC) -m finetune eval $(RECIPE) $(ARGS)
endif

# Use the tuned model: PROMPT="..." for generate (empty: an unconditional sample); REPO=user/name for push
# (ARGS="--dry-run", "--merged", "--private", "--base-model user/base"); serve takes ARGS="--port 8000 --api-key ...".
PROMPT ?=
REPO ?=
generate: setup
	$(PY) -m finetune generate $(RECIPE) --prompt "$(PROMPT)" $(ARGS)

chat: setup
	$(PY) -m finetune chat $(RECIPE) $(ARGS)

serve: setup
	$(PY) -m finetune serve $(RECIPE) $(ARGS)

merge: setup
	$(PY) -m finetune merge $(RECIPE) $(ARGS)

push: setup
	$(if $(REPO),,$(error push needs REPO=user/name))
	$(PY) -m finetune push $(RECIPE) --repo "$(REPO)" $(ARGS)

# The offline demo: pretrain a tiny GPT-2 on generated reviews, LoRA-tune it to label them, evaluate, generate.
demo: setup
	$(OFFLINE) $(PY) -m finetune train recipes/demo-pretrain.yaml
	$(OFFLINE) $(PY) -m finetune eval recipes/demo-pretrain.yaml
	$(OFFLINE) $(PY) -m finetune train recipes/demo-tune.yaml
	$(OFFLINE) $(PY) -m finetune eval recipes/demo-tune.yaml
	$(OFFLINE) $(PY) -m finetune generate recipes/demo-pretrain.yaml --prompt "The kettle" --num-samples 2 --max-new-tokens 40 --seed 0
	$(OFFLINE) $(PY) scripts/demo_summary.py

# Benchmarks (not part of the tests): each prints ratios against a baseline measured in the same run and
# appends them to bench/results/.
bench: setup
	$(OFFLINE) $(PY) -m bench.prepare_throughput
	$(OFFLINE) $(PY) -m bench.prepare_scale
	$(OFFLINE) $(PY) -m bench.packing_efficiency
	$(OFFLINE) $(PY) -m bench.train_throughput
	$(OFFLINE) $(PY) -m bench.train_vocab
	$(OFFLINE) $(PY) -m bench.eval_vs_harness
	$(OFFLINE) $(PY) -m bench.lora_params
	$(OFFLINE) $(PY) -m bench.quality_per_time
	$(OFFLINE) $(PY) -m bench.serve_latency
	$(OFFLINE) $(PY) -m bench.gpu_throughput
