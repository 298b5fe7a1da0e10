# The two commands a newcomer needs (each sets up .venv from nothing on first use):
#   make repro   run the pipeline (dvc repro) on the embedded default model and data
#   make testbed the knowledge testbed (profiles/testbed.yaml, pipelines/testbed/dvc.yaml)
#   make test    run the test suite (fast tests; `make test-slow`: real model, Prefect server,
#                fresh-venv install; `make test-s3`: SeaweedFS on loopback; `make test-gpu`: CUDA;
#                `make bench-gpu`: the GPU tests, then the kernel benchmark -> bench_out/kernels_bench.json)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow test-s3 test-gpu bench-gpu test-all repro testbed testbed-retrofit image clean

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

test-s3: setup
	$(PY) -m pytest -m s3

test-gpu: setup
	TRITON_INTERPRET=0 $(PY) -m pytest -m gpu tests/gpu

bench-gpu: test-gpu
	TRITON_INTERPRET=0 $(PY) -m slotwise.kernels.bench --json bench_out/kernels_bench.json

test-all: setup
	$(PY) -m pytest -m "not gpu and not s3"

repro: setup
	$(VENV)/bin/dvc repro
	@$(PY) -m slotwise.components.report

# The knowledge testbed (profiles/testbed.yaml): its own DVC pipeline, outputs under runs/testbed/.
testbed: setup
	$(VENV)/bin/dvc repro pipelines/testbed/dvc.yaml
	@$(PY) -m slotwise.components.report --runs runs/testbed

# The testbed's retrofit gap (pipelines/testbed_retrofit/dvc.yaml): dense twin -> memory in place of its last
# FFN -> distilled heal -> SMF, beside full finetuning of the dense twin; outputs under runs/testbed_retrofit/.
testbed-retrofit: setup
	$(VENV)/bin/dvc repro pipelines/testbed_retrofit/dvc.yaml
	@for d in continual continual_dense; do $(PY) scripts/testbed_tables.py runs/testbed_retrofit/$$d; echo; done
	@$(PY) scripts/frontier_compare.py runs/testbed_retrofit/frontier.png \
		"retrofit, distilled heal:runs/testbed_retrofit/continual/summary.json" "dense twin:runs/testbed_retrofit/continual_dense/summary.json"

# The container image without a Docker daemon (root, buildah, debootstrap), with a stage run inside it.
image:
	bash scripts/build_image.sh

clean:
	rm -rf runs .pytest_cache
