# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
#
# PyTorch: on a machine with an NVIDIA driver the normal (CUDA) build is installed; without one
# the CPU build is pinned, because an unpinned `torch` from PyPI is a multi-GB CUDA build.
# Override with TORCH_CPU_SPEC / TORCH_CPU_INDEX, e.g.
#   make setup TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu TORCH_CPU_SPEC=torch

PYTHON ?= python3
VENV ?= .venv
NNUNET_VENV ?= .venv-nnunet
ANTS_VENV ?= .venv-ants
ANTS := MEDPIPE_ANTS_PYTHON="$(CURDIR)/$(ANTS_VENV)/bin/python"
PY := $(VENV)/bin/python
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?=
TORCH_GPU_SPEC ?= torch>=2.4
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: setup ants-env test lint demo study study-part study-report study-native bench gpu-check-data clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install "$(TORCH_GPU_SPEC)"; \
	else \
		$(PY) -m pip install "$(TORCH_CPU_SPEC)" $(if $(TORCH_CPU_INDEX),--index-url $(TORCH_CPU_INDEX)); \
	fi
	$(PY) -m pip install --progress-bar off -e ".[dev]"
	# nnU-Net's network package for `nnunet_resenc`, without its dependencies: its timm pin
	# pulls torchvision, whose PyPI builds replace this torch; the U-Nets need torch and numpy
	$(PY) -m pip install --progress-bar off --no-deps "dynamic-network-architectures==0.4.4"
	touch $@

# nnU-Net v2, only as a reference (its planner in the tests, its predictor in the benchmarks),
# in its own environment: its dependencies (timm -> torchvision) pin a newer, CUDA build of torch.
$(NNUNET_VENV)/.installed:
	test -x $(NNUNET_VENV)/bin/python || $(PYTHON) -m venv $(NNUNET_VENV)
	$(NNUNET_VENV)/bin/python -m pip install --progress-bar off "nnunetv2>=2.5"
	touch $@

# ANTsPy for the ANTs SyN baseline (`registration.baselines: [ants]`), in its own environment:
# antspyx 0.6.3 pins numpy<2.4, older than medpipe's. medpipe talks to it through a worker
# process (medpipe/registration/ants_worker.py).
ants-env: $(ANTS_VENV)/.installed

$(ANTS_VENV)/.installed:
	test -x $(ANTS_VENV)/bin/python || $(PYTHON) -m venv $(ANTS_VENV)
	$(ANTS_VENV)/bin/python -m pip install --progress-bar off "antspyx==0.6.3"
	touch $@

lint: setup
	$(VENV)/bin/ruff check .

test: lint $(NNUNET_VENV)/.installed $(ANTS_VENV)/.installed
	$(ANTS) MEDPIPE_NNUNET_BIN="$(CURDIR)/$(NNUNET_VENV)/bin" $(PY) -m pytest $(PYTEST_ARGS)

demo: setup $(ANTS_VENV)/.installed
	$(VENV)/bin/medpipe demo-data $(DEMO_DIR)/raw --cases 12 --test-cases 20 --seed 0
	$(ANTS) PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/snakemake all --profile configs/profiles/local \
		--configfile configs/demo.yaml --config dataset=$(DEMO_DIR)/raw results=$(DEMO_DIR)/results
	@echo "Demo dataset: $(DEMO_DIR)/raw (preview: $(DEMO_DIR)/raw/preview.png)"
	@echo "Workflow outputs: $(DEMO_DIR)/results (plans.json, preprocessed/, runs/MODEL/fold_0/evaluation/)"
	@echo "Report: $(DEMO_DIR)/results/compare/report.html"
	@echo "MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(DEMO_DIR)/results/mlflow.db"

# The study: the demo's workflow with budgets large enough to converge (configs/study.yaml);
# its report and the MLflow store's summary are copied to docs/study/, the recorded answer.
# Its wall time counts from the first `make study` in STUDY_DIR (a resumed study included)
STUDY_DIR ?= study
# what `make study` and each `make study-part` share: the start time, the data, and Snakemake
# with the study's config on the targets given ($(call study_snakemake,TARGETS))
STUDY_START = mkdir -p $(STUDY_DIR) && test -f $(STUDY_DIR)/started || date +%s > $(STUDY_DIR)/started
STUDY_DATA = $(VENV)/bin/medpipe demo-data $(STUDY_DIR)/raw --cases 12 --test-cases 20 --seed 0
study_snakemake = $(ANTS) PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/snakemake $(1) \
	--profile configs/profiles/local \
	--configfile configs/study.yaml --config dataset=$(STUDY_DIR)/raw results=$(STUDY_DIR)/results
study: setup $(ANTS_VENV)/.installed
	$(STUDY_START)
	$(STUDY_DATA)
	$(call study_snakemake,all)
	$(PY) bench/study_record.py $(STUDY_DIR)/results docs/study --started $$(cat $(STUDY_DIR)/started)
	@echo "Report: $(STUDY_DIR)/results/compare/report.html (recorded in docs/study/)"

# The study in parts, on machines that share no disk (one CPU session at a time, cluster jobs
# on different sites): each part trains and scores some of the study's runs, with the study's
# own config (so run folders, seeds and budgets stay the study's), then archives the runs (no
# models) and the results its report reads into docs/study/runs/, beside earlier parts'.
#   STUDY_RUNS: run folders to train and score, e.g. "swin_unetr/fold_0 swin_unetr/seed_1/fold_0"
#   STUDY_TEST: models whose fold ensemble predicts and scores the test set (needs MODEL/fold_0)
#   STUDY_RULES: whole stages, e.g. registration_all, or single outputs, e.g. one registration
#     run: $(STUDY_DIR)/results/runs/pyramid/seed_1/fold_0/evaluation/summary.json (a registration
#     network is scored on the test pairs in its evaluation/, so STUDY_RUNS does not fit it)
# `make study-report` then builds the study's report and record from the whole archive.
STUDY_RUNS ?=
STUDY_TEST ?=
STUDY_RULES ?=
STUDY_PART_TARGETS = $(foreach run,$(STUDY_RUNS),$(STUDY_DIR)/results/runs/$(run)/evaluation/summary.json \
	$(STUDY_DIR)/results/runs/$(run)/evaluation_test/summary.json) \
	$(foreach model,$(STUDY_TEST),$(STUDY_DIR)/results/test/$(model)/evaluation/summary.json) $(STUDY_RULES)
study-part: setup $(ANTS_VENV)/.installed
	test -n "$(strip $(STUDY_PART_TARGETS))" || (echo "say what this part runs: STUDY_RUNS, STUDY_TEST or STUDY_RULES" >&2; exit 2)
	$(STUDY_START)
	$(STUDY_DATA)
	$(call study_snakemake,$(STUDY_PART_TARGETS))
	$(VENV)/bin/medpipe compare --config configs/study.yaml --set dataset=$(STUDY_DIR)/raw \
		--set results=$(STUDY_DIR)/results -o $(STUDY_DIR)/results/compare --archive docs/study/runs

study-report: setup
	$(VENV)/bin/medpipe compare --runs docs/study/runs -o $(STUDY_DIR)/report
	$(PY) bench/study_record.py --archive docs/study/runs --report $(STUDY_DIR)/report docs/study

# The native-recipe sensitivity check of the study: every segmentation model once
# more, one seed, with its authors' recipe (`recipe: native`), on the study's data; the config
# is the study's with those settings, written beside the results; the report is copied to
# docs/study/native/. Its wall time is printed by Snakemake's log
study-native: setup
	mkdir -p $(STUDY_DIR)
	$(STUDY_DATA)
	$(PY) -c "import sys, yaml; from medpipe.config import apply_overrides; \
		config = apply_overrides(yaml.safe_load(open('configs/study.yaml')), sys.argv[1:]); \
		open('$(STUDY_DIR)/native.yaml', 'w').write(yaml.safe_dump(config))" \
		recipe=native 'seeds=[0]' 'registration.models=[]' 'registration.baselines=[]'
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/snakemake all --profile configs/profiles/local \
		--configfile $(STUDY_DIR)/native.yaml --config dataset=$(STUDY_DIR)/raw results=$(STUDY_DIR)/native
	mkdir -p docs/study/native
	cp $(STUDY_DIR)/native/compare/report.html $(STUDY_DIR)/native/compare/report.md \
		$(STUDY_DIR)/native/compare/summary.json docs/study/native/

# The benchmarks' quick mode (bench/README.md); nnU-Net's environment for its own predictor
bench: setup $(NNUNET_VENV)/.installed $(ANTS_VENV)/.installed
	$(ANTS) MEDPIPE_NNUNET_BIN="$(CURDIR)/$(NNUNET_VENV)/bin" $(PY) bench/run_all.py --quick

# The GPU check's data (the demo's brains, preprocessed) and wheels (bench/gpu_wheels.txt, for
# the GPU machine's Python and this one's) into bench/work/gpu_check/; bench/gpu_check.sh runs it
GPU_PYTHON ?= 3.12
gpu-check-data: setup
	$(PY) bench/gpu_check.py --prepare --python-version $(GPU_PYTHON)

clean-demo:
	rm -rf $(DEMO_DIR)
