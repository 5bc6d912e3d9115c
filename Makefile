# popen: every stage is a target; each calls the popen binary.
#   make demo   the main job on the embedded default (CPU)
#   make test   the test suite (what CI runs)

CARGO   ?= cargo
PYTHON  ?= python3
SEED    ?= 0
DATA_SEED ?= 0
DATA    ?= data/synth
SYNTH_CONFIG ?= pipelines/synth.toml
OUT     ?= out/demo
# Release build for stages that do real work; tests use the dev profile (deps optimized).
POPEN   := target/release/popen
POPEN_DEV := target/debug/popen

.PHONY: venv test-slow check-fmt check-clippy popen-ablations ablation-ensemble bench-cpu build build-dev data assets test test-rust test-interop check-cuda demo baseline popen-seeds eval-pred tiny-init sft predict eval eval-fixtures baseline-seeds collect-pt collect-ps dpo ensemble-train sam-masks sam-photos bench-sam bench bench-model refenv check-refenv refenv-lock check-refenv-lock config-fixtures help test-slurm cluster-demo report

help:
	@echo "make demo        the whole POPEN pipeline: benchmark -> SFT -> collect-pt/ps -> dpo -> ensemble-train -> eval ($(OUT))"
	@echo "make baseline    benchmark -> tiny model -> SFT -> predict -> eval, with trivial baselines"
	@echo "make sft         SFT of the tiny model (SFT_CONFIG=$(SFT_CONFIG), then SFT_DECODER_CONFIG=$(SFT_DECODER_CONFIG)) into $(OUT)/sft"
	@echo "make predict     greedy answers + masks for $(SPLIT) into $(PRED)"
	@echo "make collect-pt  text preference data P_t into $(PREFS)"
	@echo "make collect-ps  segmentation preference data P_s (PHASE=1|2) into $(PREFS)"
	@echo "make dpo         preference optimization of $(MODEL) on $(PREFS)/pt.parquet + ps-phase1/2.parquet into $(OUT)/dpo"
	@echo "make sam-masks   SAM automatic-mask proposals of $(SAM_SPLIT) into $(PREFS) (SAM_POINTS=$(SAM_POINTS))"
	@echo "make sam-photos  SAM proposals + overlays of the real labelme photos into out/sam-photos"
	@echo "make eval        gIoU/cIoU/CHAIR/boundary IoU/localization error of $(PRED) + baselines"
	@echo "make report      one self-contained HTML page of $(REPORT_RUNS) into $(REPORT_OUT)"
	@echo "make test        Rust tests, interop checks (pyarrow/duckdb/pycocotools), cuda check, reference pins lock"
	@echo "make check-refenv  resolve tools/reference/requirements*.txt with pip --dry-run (needs PyPI)"
	@echo "make test-slurm  collect stages as job arrays + merge on a real one-node Slurm (root; apt-get installs slurm-wlm, munge)"
	@echo "make cluster-demo  submit the pipeline to Slurm (CLUSTER_CONFIG=$(CLUSTER_CONFIG); DRY_RUN=1 prints the sbatch calls)"
	@echo "make data        generate the embedded benchmark into $(DATA) (SEED=$(SEED))"
	@echo "make assets      fetch the pinned real weights/data of shared/ASSETS.md into data/assets"
	@echo "make bench       mask-kernel benchmark against pycocotools"
	@echo "make bench-sam   MobileSAM encoder + automatic generator timing (docs/bench-sam.md)"
	@echo "make bench-cpu   popen against PyTorch/transformers on this CPU, same-round ratios (docs/bench-cpu.md; BENCH_TINY= skips the tiny step)"
	@echo "make popen-seeds the demo for seeds 0, 1, 2 and the Table-3 table with paired differences"
	@echo "make popen-ablations  the ensemble ablations (paper's stage 3, frozen projection, no rehearsal, no gamma, fallback) on popen-seeds' models"

build:
	$(CARGO) build --release --bin popen

# Built the way `cargo test --workspace` builds it (same feature unification, no rebuild).
build-dev:
	$(CARGO) test --workspace --no-run

assets:
	$(PYTHON) tools/assets.py

data: build
	$(POPEN) synth --config $(SYNTH_CONFIG) --seed $(DATA_SEED) --out $(DATA)

test: assets check-fmt check-clippy test-rust test-interop check-refenv-lock

# The slow reference cases left out of `make test` (SAM's automatic generator at its default
# 32 points per side against the official one); run them before a release.
test-slow: assets
	$(CARGO) test --workspace --test sam -- --ignored

# Formatting (rustfmt.toml) is checked, not applied: `cargo fmt --all` fixes it.
check-fmt:
	@if $(CARGO) fmt --version >/dev/null 2>&1; then $(CARGO) fmt --all -- --check; else echo "WARNING: rustfmt is not installed (rustup component add rustfmt): formatting NOT checked"; fi

# Lints (allowed ones in Cargo.toml's [workspace.lints.clippy]) are errors. With the `cuda`
# feature on, so the GPU backend's code is linted and known to compile in the same pass
# (one check build of the dependencies instead of two: check-cuda alone is for machines
# without clippy, where this target falls back to it).
check-clippy:
	@if $(CARGO) clippy --version >/dev/null 2>&1; then CUDARC_CUDA_VERSION=13000 $(CARGO) clippy --workspace --all-targets --features popen/cuda -- -D warnings; else echo "WARNING: clippy is not installed (rustup component add clippy): lints NOT checked"; $(MAKE) --no-print-directory check-cuda; fi

# The tests read data/assets (labelme photos); order holds under make -j too.
test-rust test-interop: assets

test-rust:
	$(CARGO) test --workspace

test-interop: build-dev venv
	$(VENV)/bin/python tests/interop/check_shards.py --popen $(POPEN_DEV) --work target/interop

# The Python side of `make test` (pyarrow, duckdb, pycocotools: tools/requirements-ci.txt) in a
# project-local virtual environment, created on first use and refreshed when the pins change
# (Debian/Ubuntu's own python3 refuses `pip install` outside one).
VENV ?= target/venv
venv: $(VENV)/.installed
$(VENV)/.installed: tools/requirements-ci.txt
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { echo "error: $(PYTHON) cannot create a virtual environment (Debian/Ubuntu: sudo apt install python3-venv)"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r tools/requirements-ci.txt
	touch $@

# The GPU backend must keep compiling even where no GPU is (CI).
check-cuda:
	CUDARC_CUDA_VERSION=13000 $(CARGO) check --features cuda --bin popen

# ---- Slurm (issue 8) ----
# A real one-node Slurm on this machine runs collect-pt/collect-ps as 4-task job arrays +
# merge, kills and requeues a task, and compares with the single-process files (cmp).
# (build-dev: the popen binary `make test` built, no second build in CI.)
test-slurm: build-dev
	POPEN=$(abspath $(POPEN_DEV)) bash tests/slurm/run.sh

# The pipeline of $(CLUSTER_CONFIG) submitted with sbatch (stages chained with afterok; complete
# stages skipped). Run it from the repository root on a cluster login node.
CLUSTER_CONFIG ?= pipelines/cluster.toml
cluster-demo: build
	$(POPEN) cluster submit --config $(CLUSTER_CONFIG) $(if $(DRY_RUN),--dry-run)

# ---- the SFT baseline on the embedded benchmark ----
SFT_CONFIG ?= pipelines/sft-tiny.toml
SPLIT   ?= val
INIT    ?= $(OUT)/init
MODEL   ?= $(OUT)/sft/model
PRED    ?= $(OUT)/pred/$(SPLIT).parquet
EVAL_OUT ?= $(OUT)/eval
LEXICON ?= $(DATA)/lexicon.json

# The tiny model: a byte-level BPE learnt from the train texts; the LLM random, the vision
# tower and pixel decoder MobileSAM's (tiny-sam). The CLIP-from-scratch model instead:
#   make demo MODEL_CONFIG=pipelines/model-tiny.toml SEG_TOKENS=6 INIT_FLAGS=
MODEL_CONFIG ?= pipelines/model-tiny-sam.toml
SEG_TOKENS ?= 3
INIT_FLAGS ?= --sam-checkpoint data/assets/mobile_sam/mobile_sam.pt
tiny-init: data assets
	$(POPEN) tokenizer-tiny --data $(DATA) --out $(OUT)/tokenizer/tokenizer.json --seg-tokens $(SEG_TOKENS)
	$(POPEN) model-init --config $(MODEL_CONFIG) --tokenizer $(OUT)/tokenizer/tokenizer.json --out $(INIT) --seed $(SEED) $(INIT_FLAGS)

# Two phases: SFT_CONFIG trains the LLM side with the decoder frozen ($(OUT)/sft-llm), then
# SFT_DECODER_CONFIG trains the decoder alone at a low rate ($(OUT)/sft: the SFT model);
# SFT_DECODER_CONFIG= skips phase 2. Resumable: a killed run continues from its newest
# checkpoint when run again. The frozen SAM encoder's image embeddings are kept in SAM_CACHE
# for the next run (other seeds, the other stages).
SAM_CACHE ?= out/sam-cache
SFT_DECODER_CONFIG ?= pipelines/sft-tiny-decoder.toml
sft: tiny-init
	$(POPEN) sft --config $(SFT_CONFIG) --model $(INIT) --samples $(DATA)/train.parquet --out $(OUT)/sft-llm --seed $(SEED) --resume --sam-cache $(SAM_CACHE)
ifeq ($(strip $(SFT_DECODER_CONFIG)),)
	rm -rf $(OUT)/sft && cp -r $(OUT)/sft-llm $(OUT)/sft
else
	$(POPEN) sft --config $(SFT_DECODER_CONFIG) --model $(OUT)/sft-llm/model --samples $(DATA)/train.parquet --out $(OUT)/sft --seed $(SEED) --resume --sam-cache $(SAM_CACHE)
endif

predict: build
	$(POPEN) predict --model $(MODEL) --samples $(DATA)/$(SPLIT).parquet --out $(PRED) --sam-cache $(SAM_CACHE) $(PREDICT_FLAGS)

# One predictions shard against the ground truth into $(EVAL_OUT)/$(EVAL_NAME).
EVAL_NAME ?= model
eval-pred: build
	$(POPEN) eval --samples $(DATA)/$(SPLIT).parquet --predictions $(PRED) --lexicon $(LEXICON) --out $(EVAL_OUT)/$(EVAL_NAME) > /dev/null

eval: build
	$(POPEN) eval --samples $(DATA)/$(SPLIT).parquet --baseline nothing --lexicon $(LEXICON) --out $(EVAL_OUT)/baseline-nothing > /dev/null
	$(POPEN) eval --samples $(DATA)/$(SPLIT).parquet --baseline largest-instance --lexicon $(LEXICON) --out $(EVAL_OUT)/baseline-largest > /dev/null
	$(POPEN) eval --samples $(DATA)/$(SPLIT).parquet --predictions $(PRED) --lexicon $(LEXICON) --out $(EVAL_OUT)/model > /dev/null
	@$(PYTHON) tools/baseline_table.py $(EVAL_OUT)/model/report.json $(EVAL_OUT)/baseline-largest/report.json $(EVAL_OUT)/baseline-nothing/report.json
	@$(MAKE) --no-print-directory report

# One self-contained HTML page (results table, training curves, overlays, gIoU per template,
# provenance) of REPORT_RUNS (run folders, one per seed: mean ± std) into REPORT_OUT.
REPORT_RUNS ?= $(OUT)
REPORT_OUT ?= $(OUT)/report.html
report: build
	$(POPEN) report --runs $(REPORT_RUNS) $(REPORT_FLAGS) --out $(REPORT_OUT)

# Issue 4's baseline alone: data -> tiny model -> SFT -> predict -> eval (+ trivial baselines).
baseline: sft
	$(MAKE) --no-print-directory predict eval
	@echo "baseline: model in $(MODEL), predictions in $(PRED), reports and overlays in $(EVAL_OUT)"

# The whole POPEN pipeline on the embedded benchmark (CPU, ~30 min on 2 cores): the SFT
# baseline, then collect-pt -> collect-ps (phase 1, phase 2) -> dpo -> ensemble-train, each
# model predicted and evaluated on $(SPLIT); prints the paper's Table-3 shape. Every stage is
# resumable or skips complete outputs, so a killed demo continues when run again.
# The collect stages take DEMO_PT_SAMPLES / DEMO_PS_SAMPLES train samples (their configs'
# max_samples; 0 = all) and the ensemble predicts with K = $(ENSEMBLE_K), as the paper. The
# ensemble model is also predicted without the fed-back seg embeddings (the paper's "without
# segmentation embedding ensemble" ablation: same model, one flag).
DEMO_PT_SAMPLES ?= 96
DEMO_PS_SAMPLES ?= 32
ENSEMBLE_K ?= 3
POPEN_ROWS = "SFT baseline=model" "POPEN w/o ensemble (dpo)=dpo" "POPEN (dpo + ensemble K=$(ENSEMBLE_K))=popen" "... w/o seg-embedding ensemble=popen-no-seg-feedback" "largest instance=baseline-largest" "nothing=baseline-nothing"
POPEN_PAIRS = --paired model:dpo dpo:popen model:popen
demo: baseline
	$(MAKE) --no-print-directory collect-pt PT_FLAGS="--max-samples $(DEMO_PT_SAMPLES)"
	$(MAKE) --no-print-directory collect-ps PHASE=1 PS_FLAGS="--max-samples $(DEMO_PS_SAMPLES)"
	$(MAKE) --no-print-directory collect-ps PHASE=2 PS_FLAGS="--max-samples $(DEMO_PS_SAMPLES)"
	$(MAKE) --no-print-directory dpo
	$(MAKE) --no-print-directory predict eval-pred MODEL=$(OUT)/dpo/model PRED=$(OUT)/pred/$(SPLIT)-dpo.parquet EVAL_NAME=dpo
	$(MAKE) --no-print-directory ensemble-train
	$(MAKE) --no-print-directory predict eval-pred MODEL=$(OUT)/ensemble/model PRED=$(OUT)/pred/$(SPLIT)-popen.parquet EVAL_NAME=popen PREDICT_FLAGS="--ensemble $(ENSEMBLE_K)"
	$(MAKE) --no-print-directory predict eval-pred MODEL=$(OUT)/ensemble/model PRED=$(OUT)/pred/$(SPLIT)-popen-no-seg-feedback.parquet EVAL_NAME=popen-no-seg-feedback PREDICT_FLAGS="--ensemble $(ENSEMBLE_K) --ensemble-no-seg-feedback"
	@echo
	@echo "POPEN on the embedded benchmark ($(SPLIT) split, seed $(SEED); reports in $(EVAL_OUT)):"
	@$(PYTHON) tools/baseline_table.py --rows $(POPEN_ROWS) $(POPEN_PAIRS) --seeds $(EVAL_OUT)
	@$(MAKE) --no-print-directory report REPORT_FLAGS='--rows $(POPEN_ROWS) $(POPEN_PAIRS)'

# The demo for seeds 0, 1, 2 (out/demo, out/popen-seed-1, out/popen-seed-2): the README's
# table, mean ± std and the paired differences.
POPEN_SEED_DIRS = out/demo/eval out/popen-seed-1/eval out/popen-seed-2/eval
popen-seeds: build
	$(MAKE) --no-print-directory demo SEED=0 OUT=out/demo
	for s in 1 2; do $(MAKE) --no-print-directory demo SEED=$$s OUT=out/popen-seed-$$s || exit 1; done
	$(PYTHON) tools/baseline_table.py --rows $(POPEN_ROWS) $(POPEN_PAIRS) --seeds $(POPEN_SEED_DIRS)
	$(MAKE) --no-print-directory report REPORT_RUNS="$(POPEN_SEED_DIRS:/eval=)" REPORT_OUT=out/popen-seeds.html REPORT_FLAGS='--rows $(POPEN_ROWS) $(POPEN_PAIRS)'

# The ablations of the levers (after popen-seeds, on its models; each row one run per seed):
# the paper's stage 3 (no warm-up, only p_hat trains: SPEC 6; our tiny preset adapts the
# model first, SPEC 10.18), the warm-up without training the feedback projection (SPEC
# 10.16), the warm-up without rehearsal (adapt_plain_weight = 0), the ensemble without gamma,
# and with --ensemble-fallback (not in the paper).
ABLATION_ROWS = "POPEN (dpo + ensemble K=$(ENSEMBLE_K))=popen" "... paper's stage 3 (only p_hat, no warm-up)=popen-paper" "... warm-up without rehearsal=popen-no-rehearsal" "... feedback projection frozen after the warm-up=popen-frozen-feedback" "... w/o gamma=popen-no-gamma" "... with fallback (not in the paper)=popen-fallback" "POPEN w/o ensemble (dpo)=dpo"
popen-ablations: build
	for s in 0 1 2; do o=$$( [ $$s = 0 ] && echo out/demo || echo out/popen-seed-$$s ); \
	  $(MAKE) --no-print-directory ablation-ensemble SEED=$$s OUT=$$o ABL=paper ABL_SET="--set adapt_steps=0 --set train_seg_feedback=false" || exit 1; \
	  $(MAKE) --no-print-directory ablation-ensemble SEED=$$s OUT=$$o ABL=frozen-feedback ABL_SET="--set train_seg_feedback=false" || exit 1; \
	  $(MAKE) --no-print-directory ablation-ensemble SEED=$$s OUT=$$o ABL=no-rehearsal ABL_SET="--set adapt_plain_weight=0" || exit 1; \
	  $(MAKE) --no-print-directory predict eval-pred SEED=$$s OUT=$$o MODEL=$$o/ensemble/model PRED=$$o/pred/$(SPLIT)-popen-no-gamma.parquet EVAL_NAME=popen-no-gamma PREDICT_FLAGS="--ensemble $(ENSEMBLE_K) --ensemble-no-gamma" || exit 1; \
	  $(MAKE) --no-print-directory predict eval-pred SEED=$$s OUT=$$o MODEL=$$o/ensemble/model PRED=$$o/pred/$(SPLIT)-popen-fallback.parquet EVAL_NAME=popen-fallback PREDICT_FLAGS="--ensemble $(ENSEMBLE_K) --ensemble-fallback" || exit 1; \
	done
	$(PYTHON) tools/baseline_table.py --rows $(ABLATION_ROWS) --paired dpo:popen dpo:popen-paper popen-frozen-feedback:popen popen-no-rehearsal:popen --seeds $(POPEN_SEED_DIRS)

# One ensemble-train variant (ABL_SET: config overrides) into $(OUT)/ensemble-$(ABL), predicted
# and evaluated as popen-$(ABL).
ablation-ensemble: build assets
	$(POPEN) ensemble-train --config $(ENSEMBLE_CONFIG) $(ABL_SET) --model $(OUT)/dpo/model --samples $(DATA)/train.parquet --out $(OUT)/ensemble-$(ABL) --seed $(SEED) --resume --sam-cache $(SAM_CACHE)
	$(MAKE) --no-print-directory predict eval-pred MODEL=$(OUT)/ensemble-$(ABL)/model PRED=$(OUT)/pred/$(SPLIT)-popen-$(ABL).parquet EVAL_NAME=popen-$(ABL) PREDICT_FLAGS="--ensemble $(ENSEMBLE_K)"

# ---- preference data (issue 5) ----
PS_CONFIG ?= pipelines/collect-ps-tiny.toml
PHASE   ?= 1
PREFS   ?= $(OUT)/prefs

PT_CONFIG ?= pipelines/collect-pt-tiny.toml

# Text preference P_t of the train split (offline corrector: ground truth + lexicon).
collect-pt: build
	$(POPEN) collect-pt --config $(PT_CONFIG) --model $(MODEL) --samples $(DATA)/train.parquet --lexicon $(LEXICON) --out $(PREFS)/pt.parquet $(PT_FLAGS)

# Segmentation preference P_s of the train split for curriculum phase $(PHASE); a complete
# output is skipped on rerun (its manifest), --shard I/N splits it for job arrays.
collect-ps: build
	$(POPEN) collect-ps --config $(PS_CONFIG) --model $(MODEL) --samples $(DATA)/train.parquet --out $(PREFS)/ps-phase$(PHASE).parquet --phase $(PHASE) $(PS_FLAGS)

# Preference optimization (POPEN stage 2, SPEC 5) of $(MODEL) on P_t and both curriculum
# phases of P_s (make collect-pt; make collect-ps PHASE=1; make collect-ps PHASE=2). Resumable
# (--resume: a killed run continues from its newest checkpoint). The phase-1 indicator needs
# the proposals collect-ps scored with: the samples' instance masks by default; after
# `collect-ps --proposals`, set DPO_PROPOSALS="--proposals $(PREFS)/sam-train.parquet".
DPO_CONFIG ?= pipelines/dpo-tiny.toml
DPO_PROPOSALS ?= --samples $(DATA)/train.parquet
dpo: build
	$(POPEN) dpo --config $(DPO_CONFIG) --model $(MODEL) --pt $(PREFS)/pt.parquet --ps-phase1 $(PREFS)/ps-phase1.parquet --ps-phase2 $(PREFS)/ps-phase2.parquet $(DPO_PROPOSALS) --out $(OUT)/dpo --seed $(SEED) --resume --sam-cache $(SAM_CACHE)

# POPEN stage 3 (SPEC 6): L_ti + L_si on p_hat and the feedback projection (SPEC 10.16), after
# the tiny preset's supervised warm-up (SPEC 10.18; MiniLM from make assets); resumable.
# Then `popen predict --ensemble 3 --model $(OUT)/ensemble/model` is POPEN's inference.
ENSEMBLE_CONFIG ?= pipelines/ensemble-tiny.toml
ensemble-train: build assets
	$(POPEN) ensemble-train --config $(ENSEMBLE_CONFIG) --model $(OUT)/dpo/model --samples $(DATA)/train.parquet --out $(OUT)/ensemble --seed $(SEED) --resume --sam-cache $(SAM_CACHE)

# SAM proposals (proposal/1) of a split for collect-ps --proposals and eval --proposals.
# Resumable (rerun after a kill continues), --shard I/N for job arrays; CPU takes ~1 min per
# image at SAM's 32 points per side, so the tiny benchmark defaults to 16.
SAM_CONFIG ?= pipelines/sam-masks.toml
SAM_SPLIT  ?= train
SAM_POINTS ?= 16
sam-masks: build assets
	$(POPEN) sam-masks --config $(SAM_CONFIG) --samples $(DATA)/$(SAM_SPLIT).parquet --points-per-side $(SAM_POINTS) --out $(PREFS)/sam-$(SAM_SPLIT).parquet

# The README's overlay: MobileSAM's automatic masks (SAM defaults) on the three real photos.
sam-photos: build assets
	$(POPEN) sam-masks --config $(SAM_CONFIG) --images data/assets/labelme/JPEGImages --out out/sam-photos/photos.parquet --overlays 3

# CPU timing of MobileSAM (encoder, automatic generator) for docs/bench-sam.md (release, as
# `make build` builds the popen binary).
bench-sam: assets
	$(CARGO) run --release -p popen-sam --example sam_bench -- data/assets/labelme/JPEGImages/2011_000003.jpg data/assets/mobile_sam/mobile_sam.pt 3 1

# The README's seed spread of the SFT baseline: SEED=0,1,2 into out/seed-* (`make popen-seeds`
# continues these runs with the rest of the pipeline).
baseline-seeds: build
	for s in 0 1 2; do $(MAKE) --no-print-directory baseline SEED=$$s OUT=out/seed-$$s || exit 1; done
	$(PYTHON) tools/baseline_table.py --seeds out/seed-0/eval out/seed-1/eval out/seed-2/eval

# Regenerates crates/popen-eval/tests/fixtures (numpy + SciPy + pycocotools, no torch).
EVALENV ?= target/evalenv
eval-fixtures: data
	test -x $(EVALENV)/bin/python || $(PYTHON) -m venv $(EVALENV)
	$(EVALENV)/bin/pip install --disable-pip-version-check -q -r tools/reference/requirements-eval.txt
	$(EVALENV)/bin/python tools/reference/pixellm_eval.py cases --samples $(DATA)/val.parquet --out crates/popen-eval/tests/fixtures/pixellm_eval_cases.json
	$(EVALENV)/bin/python tools/reference/pixellm_eval.py run --cases crates/popen-eval/tests/fixtures/pixellm_eval_cases.json --out crates/popen-eval/tests/fixtures/pixellm_eval_expected.json
	$(EVALENV)/bin/python tools/reference/pixellm_eval.py lsap --out crates/popen-eval/tests/fixtures/lsap_scipy.json

# The Python reference (pycocotools, cv2) runs first on the same generated inputs; the Rust
# bench reads its timings and prints both side by side (docs/bench-masks.md).
# The reference environment of tools/reference (torch, transformers: CPU use, ~3 GB).
REFENV ?= target/refenv
refenv:
	test -x $(REFENV)/bin/python || $(PYTHON) -m venv $(REFENV)
	$(REFENV)/bin/pip install --disable-pip-version-check -q -r tools/reference/requirements.txt

# The pins of tools/reference/requirements*.txt resolve (pip --dry-run in fresh virtual
# environments; needs PyPI, installs nothing; see tools/reference/check_requirements.py).
# refenv-lock also records the resolved sets in tools/reference/requirements.lock.json, which
# check-refenv-lock (offline, ~1 s, part of `make test`) checks against the pins and itself.
check-refenv:
	$(PYTHON) tools/reference/check_requirements.py resolve

refenv-lock:
	$(PYTHON) tools/reference/check_requirements.py resolve --write-lock

check-refenv-lock:
	$(PYTHON) tools/reference/check_requirements.py lock

# crates/popen-model/tests/fixtures/config_generations: the configs transformers 4.x
# (requirements.txt's pins, without torch) and 5.x (requirements-tf5.txt) write.
CFGENV4 ?= target/cfgenv4
CFGENV5 ?= target/cfgenv5
config-fixtures:
	test -x $(CFGENV4)/bin/python || $(PYTHON) -m venv $(CFGENV4)
	$(CFGENV4)/bin/pip install --disable-pip-version-check -q $$(grep -E '^(transformers|tokenizers|safetensors|numpy)==' tools/reference/requirements.txt tools/reference/requirements-masks.txt | cut -d: -f2)
	test -x $(CFGENV5)/bin/python || $(PYTHON) -m venv $(CFGENV5)
	$(CFGENV5)/bin/pip install --disable-pip-version-check -q -r tools/reference/requirements-tf5.txt
	$(CFGENV4)/bin/python tools/reference/config_generations_fixture.py write
	$(CFGENV5)/bin/python tools/reference/config_generations_fixture.py write
	$(CFGENV5)/bin/python tools/reference/config_generations_fixture.py interpret

# The tiny PixelLM step on CPU (Flex and NdArray) beside the same model in PyTorch
# (docs/bench-model.md); ratios in the printed table.
# Issue 21: popen against the PyTorch / transformers references on this CPU, in rounds, one
# ratio table (tools/bench_cpu.py; results for docs/bench-cpu.md in target/bench-cpu).
# BENCH_TINY= skips the tiny-model step (its cargo bench builds burn with other features);
# BENCH_DECODE= skips decode/prefill; BENCH_SFT= skips the tiny-sam SFT step of `make demo`
# (tools/reference/bench_sft_step.py against `popen sft`; its inputs are made once under
# BENCH_SFT_WORK, the first time with the SAM embeddings of the train images: minutes).
BENCH_ROUNDS ?= 3
BENCH_TINY ?= $(CARGO) bench -p popen-model --bench tiny_model --features bench-flex
BENCH_DECODE ?= 1
BENCH_SFT ?= 1
BENCH_SFT_WORK ?= out/bench-sft
bench-cpu: build refenv assets
	$(PYTHON) tools/bench_cpu.py --python $(REFENV)/bin/python --popen $(POPEN) --rounds $(BENCH_ROUNDS) --tiny-bench "$(BENCH_TINY)" $(if $(strip $(BENCH_DECODE)),,--no-decode) $(if $(strip $(BENCH_SFT)),--sft-step --sft-work $(BENCH_SFT_WORK))

bench-model: refenv
	$(REFENV)/bin/python tools/reference/bench_tiny_model.py
	$(CARGO) bench -p popen-model --bench tiny_model --features bench-flex

bench:
	$(PYTHON) -m pip install --disable-pip-version-check -q -r tools/reference/requirements-masks.txt
	$(PYTHON) tools/reference/bench_masks.py
	$(CARGO) bench -p popen-core --bench mask_kernels
