# Weft: `make demo` runs the main job on the built-in corpus, `make test` runs the CI tests.
# Both create (or reuse) a virtual environment in $(VENV).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned first so a CPU machine never pulls the multi-GB CUDA build; GPU users may override, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.weft-installed
RUN ?= runs/demo
WORKERS ?= 2
RANKS ?= 2
TP ?=
SP ?=
ARGS ?=
# The demo's training command, for $(RANKS) ranks into $(1); TP / SP, when set, override the parallel group.
TRAIN_DEMO = OMP_NUM_THREADS=1 $(PY) -m engine.launch --standalone --nproc-per-node $(RANKS) -m engine.train \
	train=demo optim=adamw_small data.prefix=$(RUN)/shards/stdlib data.tokenizer=$(RUN)/tokenizer \
	$(if $(TP),parallel.tp=$(TP)) $(if $(SP),parallel.sequence_parallel=$(SP)) \
	train.run_dir=$(1) train.resume=none logging.wandb=true logging.wandb_mode=offline $(ARGS)

.PHONY: help venv test test-slow lint demo demo-tp demo-3d bench gpu-check clean

help:
	@echo "make demo       built-in corpus -> tokenizer -> shards -> a small GPT trained by $(RANKS) CPU ranks, in $(RUN)/"
	@echo "make demo-tp    the same job on 4 ranks as tensor parallel 2 x data parallel 2 (with SP), compared with make demo's"
	@echo "make demo-3d    the same job on 8 ranks as tp 2 (SP) x pipeline 2 (1F1B) x dp 2, compared with make demo's"
	@echo "make test       lint + the fast test tier (what CI runs; < 10 min on 2 cores)"
	@echo "make test-slow  the full matrices and long fault trials"
	@echo "make bench      data pipeline, training step, checkpoint, pipeline, ZeRO and (on CUDA) kernel benchmarks"
	@echo "make gpu-check  on a CUDA machine: kernel tests compiled, kernel benchmark, 124M/1B end to end (runs/gpu/)"
	@echo "make clean      remove $(VENV) and runs/"

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow"

# DeepSpeed is the ZeRO tests' oracle: installed without prebuilt ops, after the torch pin (its own torch>=2 would
# pull a CUDA build); its ops compile on first use into .cache/torch_extensions.
test-slow: $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -c constraints.txt deepspeed==0.19.8
	TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions $(PY) -m pytest -q -m slow

# The main job: corpus -> tokenizer -> shards -> a small GPT trained by $(RANKS) data-parallel CPU ranks.
demo: $(STAMP)
	$(PY) tools/build_corpus.py --output $(RUN)/corpus.jsonl --max-size 8MB
	$(PY) tools/train_tokenizer.py --input $(RUN)/corpus.jsonl --output $(RUN)/tokenizer --vocab-size 4096
	$(PY) tools/preprocess_data.py --input $(RUN)/corpus.jsonl --output-prefix $(RUN)/shards/stdlib \
		--tokenizer $(RUN)/tokenizer --workers $(WORKERS) --overwrite
	$(PY) tools/inspect_shards.py $(RUN)/shards/stdlib --tokenizer $(RUN)/tokenizer --verify --entropy
	$(call TRAIN_DEMO,$(RUN)/train)
	@echo "a sample from the trained model (tools/generate.py, KV-cached):"
	$(PY) tools/generate.py --checkpoint $(RUN)/train --prompt "def " --max-new-tokens 120 --temperature 0.8 --top-k 40
	@echo
	@echo "demo done: compare the final val_loss with the unigram entropy printed above"
	@echo "  shards:      $(RUN)/shards"
	@echo "  run:         $(RUN)/train (metrics.jsonl, run_info.json, config.yaml)"
	@echo "  checkpoints: $(RUN)/train/checkpoints (latest: $$(cat $(RUN)/train/checkpoints/latest))"
	@echo "  W&B offline: $$(ls -d $(RUN)/train/wandb/offline-run-* | tail -1) (upload: wandb sync <dir>)"

# The demo's training again on 4 ranks as tensor parallel 2 x data parallel 2 with sequence parallelism, on make
# demo's shards (run first if absent), then both loss curves side by side. dp is 2 in both, so batches and data
# order are the same; only fp32 rounding differs (summation order), and it grows over 300 steps: 2e-3 measured.
demo-tp: RANKS = 4
demo-tp: $(STAMP)
	@test -f $(RUN)/train/metrics.jsonl || $(MAKE) demo
	$(call TRAIN_DEMO,$(RUN)_tp2/train) parallel=tp2
	$(PY) tools/compare_runs.py $(RUN)_tp2/train $(RUN)/train --rtol 5e-3

# The demo's training on 8 ranks as the full 3D mesh: tensor parallel 2 (SP) x pipeline parallel 2 (1F1B) x data
# parallel 2, on make demo's shards (run first if absent), then both loss curves side by side. dp is 2 in both, so
# batches, data order and dropout masks are the same; only fp32 summation order differs.
demo-3d: RANKS = 8
demo-3d: $(STAMP)
	@test -f $(RUN)/train/metrics.jsonl || $(MAKE) demo
	$(call TRAIN_DEMO,$(RUN)_3d/train) parallel=tp2_pp2_dp2
	$(PY) tools/compare_runs.py $(RUN)_3d/train $(RUN)/train --rtol 5e-3

# Everything only a GPU can show, in the order worth spending a short GPU lease on; outputs in runs/gpu/ for
# docs/results.md. Needs a CUDA build of torch in the venv (see README: TORCH=...); on a machine whose python3
# already holds torch, triton and pytest and which cannot install: `make gpu-check PY=python3 STAMP=`.
GPU_OUT ?= runs/gpu
gpu-check: SHELL := /bin/bash
gpu-check: .SHELLFLAGS := -o pipefail -c
gpu-check: $(STAMP)
	mkdir -p $(GPU_OUT)
	@# every step runs even after one fails (a lease is too short to find failures one at a time); fails if any did
	export PYTHONUNBUFFERED=1; status=0; \
	$(PY) -m pytest -q tests/test_kernels_triton.py 2>&1 | tee $(GPU_OUT)/kernel_tests.txt || status=1; \
	$(PY) tools/bench_train.py --device cuda --precision bf16 --model gpt2_124m --seq-len 1024 --batch 16 \
		--vocab 50304 --kernels torch triton 2>&1 | tee $(GPU_OUT)/bench_train_124m.txt || status=1; \
	$(PY) tools/bench_train.py --device cuda --precision bf16 --model llama_1b --seq-len 2048 --batch 4 \
		--vocab 32000 --kernels torch triton 2>&1 | tee $(GPU_OUT)/bench_train_1b.txt || status=1; \
	$(PY) tools/bench_kernels.py 2>&1 | tee $(GPU_OUT)/bench_kernels.txt || status=1; \
	exit $$status

bench: $(STAMP)
	$(PY) tools/bench_preprocess.py --workdir runs/bench
	$(PY) tools/bench_train.py
	$(PY) tools/bench_checkpoint.py
	$(PY) tools/bench_reshard.py
	$(PY) tools/bench_pipeline.py
	$(PY) tools/bench_zero.py
	$(PY) tools/bench_kernels.py

clean:
	rm -rf $(VENV) runs
