# Two entry points: `make demo` (install + compile the embedded demo model + generate + verify)
# and `make test` (install + the test suite; CI runs exactly this through .ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= out/qwen2-moe-demo
PROMPT ?= The quick brown fox
MESSAGE ?= What is a mixture of experts?

.PHONY: install demo test

install: $(VENV)/.installed

# torch is pinned to the local CPU wheel first: any other spec would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]'
	touch $@

demo: install
	$(VENV)/bin/moe-compile build qwen2-moe-demo -o $(DEMO_OUT) --max-seq 512
	$(VENV)/bin/moe-compile run $(DEMO_OUT) --prompt "$(PROMPT)" --max-new-tokens 48
	$(VENV)/bin/moe-compile run $(DEMO_OUT) --system "You are a helpful assistant." --message "$(MESSAGE)" --max-new-tokens 48
	$(VENV)/bin/moe-compile verify $(DEMO_OUT)

test: install
	$(PY) -m pytest -q -p no:logging -n auto --durations=25 tests
