# popen: every stage is a target; each calls the popen binary.
#   make demo   the main job on the embedded default (CPU)
#   make test   the test suite (what CI runs)

CARGO   ?= cargo
PYTHON  ?= python3
SEED    ?= 0
DATA    ?= data/synth
OUT     ?= out/demo
# Release build for stages that do real work; tests use the dev profile (deps optimized).
POPEN   := target/release/popen
POPEN_DEV := target/debug/popen

.PHONY: build build-dev data assets test test-rust test-interop check-cuda demo bench bench-model refenv help

help:
	@echo "make demo        generate the embedded benchmark and render overlays ($(OUT))"
	@echo "make test        Rust tests, interop checks (pyarrow/duckdb/pycocotools), cuda check"
	@echo "make data        generate the embedded benchmark into $(DATA) (SEED=$(SEED))"
	@echo "make assets      fetch the pinned real weights/data of shared/ASSETS.md into data/assets"
	@echo "make bench       mask-kernel benchmark against pycocotools"

build:
	$(CARGO) build --release --bin popen

# Built the way `cargo test --workspace` builds it (same feature unification, no rebuild).
build-dev:
	$(CARGO) test --workspace --no-run

assets:
	$(PYTHON) tools/assets.py

data: build
	$(POPEN) synth --config pipelines/synth.toml --seed $(SEED) --out $(DATA)

test: assets test-rust test-interop check-cuda

# The tests read data/assets (labelme photos); order holds under make -j too.
test-rust test-interop: assets

test-rust:
	$(CARGO) test --workspace

test-interop: build-dev
	$(PYTHON) tests/interop/check_shards.py --popen $(POPEN_DEV) --work target/interop

# The GPU backend must keep compiling even where no GPU is (CI).
check-cuda:
	CUDARC_CUDA_VERSION=13000 $(CARGO) check --features cuda --bin popen

demo: data
	@mkdir -p $(OUT)
	@for i in 0 1 2 3; do $(POPEN) show --shard $(DATA)/val.parquet --index $$i --out $(OUT)/val_$$i.png || exit 1; done
	$(POPEN) inspect $(DATA)/val.parquet --head 5
	@echo "demo: benchmark in $(DATA), overlays in $(OUT)"

# The Python reference (pycocotools, cv2) runs first on the same generated inputs; the Rust
# bench reads its timings and prints both side by side (docs/bench-masks.md).
# The reference environment of tools/reference (torch, transformers: CPU use, ~3 GB).
REFENV ?= target/refenv
refenv:
	test -x $(REFENV)/bin/python || $(PYTHON) -m venv $(REFENV)
	$(REFENV)/bin/pip install --disable-pip-version-check -q -r tools/reference/requirements.txt

# The tiny PixelLM step on CPU (Flex and NdArray) beside the same model in PyTorch
# (docs/bench-model.md); ratios in the printed table.
bench-model: refenv
	$(REFENV)/bin/python tools/reference/bench_tiny_model.py
	$(CARGO) bench -p popen-model --bench tiny_model --features bench-flex

bench:
	$(PYTHON) -m pip install --disable-pip-version-check -q -r tools/reference/requirements-masks.txt
	$(PYTHON) tools/reference/bench_masks.py
	$(CARGO) bench -p popen-core --bench mask_kernels
