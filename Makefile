# gpt2-finetune: every stage is a make target. RECIPE=path/to/recipe.yaml selects the run.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
RECIPE ?= recipes/demo-tune.yaml
ARGS ?=
OFFLINE := HF_HUB_OFFLINE=1
PROMPT ?=
REPO ?=
TO ?=
TYPES ?=
ACCELERATE_CONFIG ?=

# Text a user types (a recipe path, a prompt, a repo id) reaches the commands through the environment, as typed:
# $(value X) stops make expanding it and "$$MAKE_X" stops the shell parsing it. ARGS alone is split into words.
export MAKE_RECIPE := $(value RECIPE)
export MAKE_PROMPT := $(value PROMPT)
export MAKE_REPO := $(value REPO)
export MAKE_TO := $(value TO)
export MAKE_TYPES := $(value TYPES)
export MAKE_ACCELERATE_CONFIG := $(value ACCELERATE_CONFIG)

.PHONY: setup test test-fast lint prepare train eval demo demo-preference demo-reward bench generate chat serve merge export push
NPROC ?= 1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The suite runs in TEST_WORKERS processes (pytest-xdist), each test file in one of them; most tests use one thread.
TEST_WORKERS ?= 2
test: setup
	$(OFFLINE) $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --durations=25 $(ARGS)

# The edit loop: the suite without the tests marked slow (kills and resumes, several processes, whole recipes).
test-fast: setup
	$(OFFLINE) $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check finetune tests bench scripts data

prepare: setup
	$(PY) -m finetune prepare "$$MAKE_RECIPE" $(ARGS)

# NPROC>1 or NNODES>1: prepare here, then `accelerate launch` NPROC processes on this machine (ranks only check
# that the prepared data is current and the same on every rank). Several machines: run the same command on each,
# with NNODES=n NODE_RANK=i (0 on the machine at MASTER_ADDR) MASTER_ADDR=host MASTER_PORT=port.
# ACCELERATE_CONFIG=recipes/accelerate/{ddp,fsdp,deepspeed-zero2,deepspeed-zero3}.yaml picks the setup; without
# it, --multi_gpu (DDP; on a machine without CUDA the ranks run as gloo CPU processes).
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
LAUNCH = $(VENV)/bin/accelerate launch $(if $(MAKE_ACCELERATE_CONFIG),--config_file "$$MAKE_ACCELERATE_CONFIG",--multi_gpu) \
	--num_processes $$(( $(NPROC) * $(NNODES) )) --num_machines $(NNODES) --machine_rank $(NODE_RANK) \
	--main_process_ip $(MASTER_ADDR) --main_process_port $(MASTER_PORT)
ONE_PROCESS = $(filter 11,$(NPROC)$(NNODES))

train: setup
ifneq ($(ONE_PROCESS),)
	$(PY) -m finetune train "$$MAKE_RECIPE" $(ARGS)
else
	$(PY) -m finetune prepare "$$MAKE_RECIPE" $(ARGS)
	$(LAUNCH) -m finetune train "$$MAKE_RECIPE" $(ARGS)
endif

# eval: ARGS takes recipe overrides and --model FOLDER (default: the run's final/); NPROC, NNODES as for train.
eval: setup
ifneq ($(ONE_PROCESS),)
	$(PY) -m finetune eval "$$MAKE_RECIPE" $(ARGS)
else
	$(PY) -m finetune prepare "$$MAKE_RECIPE" $(filter-out --%,$(foreach a,$(ARGS),$(if $(findstring =,$(a)),$(a))))
	$(LAUNCH) -m finetune eval "$$MAKE_RECIPE" $(ARGS)
endif

# Use the tuned model: PROMPT="..." for generate (empty: an unconditional sample); REPO=user/name for push
# (ARGS="--dry-run", "--merged", "--private", "--base-model user/base"); serve takes ARGS="--port 8000 --api-key ...".
generate: setup
	$(PY) -m finetune generate "$$MAKE_RECIPE" --prompt "$$MAKE_PROMPT" $(ARGS)

chat: setup
	$(PY) -m finetune chat "$$MAKE_RECIPE" $(ARGS)

serve: setup
	$(PY) -m finetune serve "$$MAKE_RECIPE" $(ARGS)

merge: setup
	$(PY) -m finetune merge "$$MAKE_RECIPE" $(ARGS)

# TO=gguf (TYPES=f16,q8_0 from f32, f16, q8_0; default f16) or TO=onnx, into the run folder's gguf/ or onnx/.
export: setup
	$(if $(MAKE_TO),,$(error export needs TO=gguf or TO=onnx))
	$(PY) -m finetune export "$$MAKE_RECIPE" --to "$$MAKE_TO" $(if $(MAKE_TYPES),--types "$$MAKE_TYPES") $(ARGS)

push: setup
	$(if $(MAKE_REPO),,$(error push needs REPO=user/name))
	$(PY) -m finetune push "$$MAKE_RECIPE" --repo "$$MAKE_REPO" $(ARGS)

# The offline demo: pretrain a tiny GPT-2 on generated reviews, LoRA-tune it to label them, evaluate, generate.
demo: setup
	$(OFFLINE) $(PY) -m finetune train recipes/demo-pretrain.yaml
	$(OFFLINE) $(PY) -m finetune eval recipes/demo-pretrain.yaml
	$(OFFLINE) $(PY) -m finetune train recipes/demo-tune.yaml
	$(OFFLINE) $(PY) -m finetune eval recipes/demo-tune.yaml
	$(OFFLINE) $(PY) -m finetune generate recipes/demo-pretrain.yaml --prompt "The kettle" --num-samples 2 --max-new-tokens 40 --seed 0
	$(OFFLINE) $(PY) scripts/demo_summary.py

# Preference tuning on the demo: DPO teaches the pretrained review writer to write positive reviews, judged before
# and after by the classifier demo-tune trained (runs `make demo` first when its models are missing).
demo-preference: setup
	@test -f outputs/demo-tune/final/recipe.yaml || $(MAKE) demo
	$(OFFLINE) $(PY) -m finetune train recipes/demo-dpo.yaml
	$(OFFLINE) $(PY) -m finetune eval recipes/demo-dpo.yaml
	$(OFFLINE) $(PY) scripts/demo_summary.py preference

# Tuning with a reward on the demo: GRPO teaches the review writer to write reviews demo-tune's classifier calls
# positive, judged also by a word list training never saw (runs `make demo` first when its models are missing).
demo-reward: setup
	@test -f outputs/demo-tune/final/recipe.yaml || $(MAKE) demo
	$(OFFLINE) $(PY) -m finetune train recipes/demo-grpo.yaml
	$(OFFLINE) $(PY) -m finetune eval recipes/demo-grpo.yaml
	$(OFFLINE) $(PY) scripts/demo_summary.py reward

# Benchmarks (not part of the tests): each prints ratios against a baseline measured in the same run and
# appends them to bench/results/.
bench: setup
	$(OFFLINE) $(PY) -m bench.prepare_throughput
	$(OFFLINE) $(PY) -m bench.prepare_scale
	$(OFFLINE) $(PY) -m bench.long_records
	$(OFFLINE) $(PY) -m bench.packing_efficiency
	$(OFFLINE) $(PY) -m bench.train_throughput
	$(OFFLINE) $(PY) -m bench.dpo_throughput
	$(OFFLINE) $(PY) -m bench.grpo_throughput
	$(OFFLINE) $(PY) -m bench.train_vocab
	$(OFFLINE) $(PY) -m bench.eval_vs_harness
	$(OFFLINE) $(PY) -m bench.lora_params
	$(OFFLINE) $(PY) -m bench.quality_per_time
	$(OFFLINE) $(PY) -m bench.serve_latency
	$(OFFLINE) $(PY) -m bench.export_gguf
	$(OFFLINE) $(PY) -m bench.export_onnx
	$(OFFLINE) $(PY) -m bench.gpu_throughput
