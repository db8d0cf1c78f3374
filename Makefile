# vla-export: the Makefile only wires stages together; each target is one `vla-export` command.
#   make demo      set up .venv, build demo data + checkpoint, run the whole pipeline, print the report
#   make test      set up .venv and run the tests (make test-lerobot: the LeRobot tests, in their own env)
# Variables: CHECKPOINT=path (default: the trained demo checkpoint), ARTIFACTS=dir, EPISODES=dir, PRESET=tiny|small|full,
#            AOTI_CACHE=dir (AOTInductor code by graph fingerprint)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
VLA := $(VENV)/bin/vla-export
PRESET ?= tiny
EPISODES ?= data/episodes
DEMO_CHECKPOINT := checkpoints/demo
CHECKPOINT ?= $(DEMO_CHECKPOINT)
ARTIFACTS ?= artifacts
BUNDLE ?= dist/policy
VERIFY ?= verify
AOTI_CACHE ?= .cache/aoti
# exit code of a stage whose backend this machine lacks (vla_export.errors.EXIT_UNAVAILABLE): reported as skipped
SKIP := 4

.PHONY: demo test test-lerobot lerobot-pipeline core install data checkpoint export quantize trt trt-api aoti aoti-cache aoti-demo validate profile report bundle verify lint clean help
.DEFAULT_GOAL := help

help:
	@sed -n '2,5p' Makefile

# The demo needs only the core packages; the tests add the dev, ROS 2 and Ray extras on top (a second stamp), so a
# newcomer's `make demo` does not wait for packages it never imports.
# --no-compile: pip byte-compiles every file it installs (58 of the core install's 93 s on a 2-core EPYC); without it
# Python compiles each module the first time one is imported (~11 s for what the pipeline imports), so bytecode
# writing must not be switched off for the commands below (PYTHONDONTWRITEBYTECODE, unexported).
unexport PYTHONDONTWRITEBYTECODE
PIP_INSTALL := $(PY) -m pip install -q --no-compile -c constraints.txt
$(VENV)/.installed-core: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-core
	$(PIP_INSTALL) -e '.[dev,ros,ray]'
	touch $@

core: $(VENV)/.installed-core

install: $(VENV)/.installed

data: core
	@test -f $(EPISODES)/.complete || $(VLA) episodes synth -o $(EPISODES) --count 72 --seed 0

# The demo checkpoint is trained once; a user checkpoint (CHECKPOINT=...) is used as given.
checkpoint: data
	@if [ "$(CHECKPOINT)" = "$(DEMO_CHECKPOINT)" ] && [ ! -f $(CHECKPOINT)/config.json ]; then \
		$(VLA) checkpoint --preset $(PRESET) --train $(EPISODES) -o $(CHECKPOINT); fi

export: checkpoint
	$(VLA) export $(CHECKPOINT) -o $(ARTIFACTS) --episodes $(EPISODES)

# One call for the three modes: the fp32 reference is built once and shared; each artifact is gated on its own.
quantize: export
	$(VLA) quantize $(ARTIFACTS)/model.onnx --mode dynamic,fp16,static --calib $(EPISODES) --episodes $(EPISODES)

# TensorRT needs a CUDA GPU and `pip install 'vla-export[trt]'`; without them the stage is reported as skipped.
trt: quantize
	@for spec in "model.onnx fp16" "model.int8-static.onnx int8"; do set -- $$spec; \
		$(VLA) trt $(ARTIFACTS)/$$1 --precision $$2; rc=$$?; \
		if [ $$rc -eq $(SKIP) ]; then echo "trt $$2: SKIPPED (see the line above)"; \
		elif [ $$rc -ne 0 ]; then exit $$rc; fi; done

# No TensorRT here? Check the trt stage's code against TensorRT's real Python bindings of 8.6 .. 11.4 (names, enum
# members, call signatures; the libraries are replaced by stubs, so nothing is built or run).
trt-api: core
	$(PY) scripts/check_trt_api.py --out $(ARTIFACTS)/trt_api.json

aoti: checkpoint
	$(VLA) aoti $(CHECKPOINT) -o $(ARTIFACTS) --device cpu --dtype fp32 --cache $(AOTI_CACHE)

# AOTInductor compiles the graph, not the weights (they go beside the package), so the demo compiles an untrained
# checkpoint of its config while it trains (training uses one core); the trained checkpoint's `aoti-demo` then takes
# the code from the cache and only writes and checks its own weights, beside export -> quantize -> trt. Both write
# their output to a log and print one line: the screen shows the progress of training and export.
AOTI_LAYOUT := $(AOTI_CACHE)/demo-layout
aoti-cache: core
	@if [ "$(CHECKPOINT)" = "$(DEMO_CHECKPOINT)" ] && [ ! -f $(CHECKPOINT)/config.json ]; then \
		echo "aoti-cache: compiling the demo config's AOTInductor code beside training (log: $(AOTI_LAYOUT).log)"; \
		mkdir -p $(AOTI_CACHE); \
		{ $(VLA) checkpoint --preset $(PRESET) --random -o $(AOTI_LAYOUT) && \
		  $(VLA) aoti $(AOTI_LAYOUT) -o $(AOTI_LAYOUT)/aoti --device cpu --dtype fp32 --cache $(AOTI_CACHE); \
		} > $(AOTI_LAYOUT).log 2>&1 || { cat $(AOTI_LAYOUT).log; exit 1; }; fi

aoti-demo: checkpoint aoti-cache
	@mkdir -p $(ARTIFACTS); \
	$(VLA) aoti $(CHECKPOINT) -o $(ARTIFACTS) --device cpu --dtype fp32 --cache $(AOTI_CACHE) \
		> $(ARTIFACTS)/aoti.log 2>&1 || { cat $(ARTIFACTS)/aoti.log; exit 1; }; tail -n 1 $(ARTIFACTS)/aoti.log

validate: core
	$(VLA) validate $(ARTIFACTS) --episodes $(EPISODES)

profile: core
	$(VLA) profile $(ARTIFACTS)

report: core
	$(VLA) report $(ARTIFACTS)

# The dynamic INT8 ONNX is what the robot's CPU runs; the fp16 and static-QDQ ONNX travel beside it, because TensorRT
# parses neither quantize_dynamic's ops nor (on 11.x) fp32 -> fp16 flags: `vla-export trt --bundle` on the target
# builds its engines from them. The self-test set comes from the validation episodes.
bundle: core
	$(VLA) bundle --artifact $(ARTIFACTS)/model.int8.onnx -o $(BUNDLE) --episodes $(EPISODES) \
		--extra $(ARTIFACTS)/model.fp16.onnx --extra $(ARTIFACTS)/model.int8-static.onnx

# The check a target runs: every artifact of the bundle against the reference outputs that travelled with it.
verify: core
	$(VLA) verify $(BUNDLE) --out $(VERIFY)

# Two jobs on two cores: the AOTI compile beside training (aoti-cache), then the trained checkpoint's package beside
# export -> quantize -> trt (aoti-demo). Profiling runs alone: its timings must not share the CPU.
demo:
	$(MAKE) --no-print-directory -j2 trt aoti-demo
	$(MAKE) --no-print-directory validate profile report bundle verify

test: install
	$(PY) -m pytest -q

# LeRobot pins torch<2.11, so its tests get their own environment (.venv-lerobot, ~9 GB: torch 2.10 with CUDA
# libraries); bundles and Policy never need it.
test-lerobot:
	scripts/lerobot_env.sh

# Every stage for each LeRobot policy (tiny ACT and Diffusion Policy, a LeRobot v3 dataset written by LeRobot) through
# the CLI, and the table of which quantize modes pass their gates, with the numbers (docs/lerobot.md).
LEROBOT_PIPELINE ?= artifacts/lerobot-pipeline
lerobot-pipeline:
	scripts/lerobot_env.sh --build
	$${LEROBOT_VENV:-.venv-lerobot}/bin/python scripts/lerobot_pipeline.py --out $(LEROBOT_PIPELINE)

lint: install
	$(VENV)/bin/ruff check vla_export tests scripts

clean:
	rm -rf $(ARTIFACTS) dist $(VERIFY) $(AOTI_CACHE)
