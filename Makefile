# One command for each job; both build the virtual environment they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOGDIR ?= logs
PORT ?= 6006
# Test processes (pytest-xdist); a test file stays in one, so its module fixtures are built once.
WORKERS ?= 2

.PHONY: test demo lint install-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## make test: lint, the installed-wheel check, then the whole test suite: on TensorFlow (browser tests need
## Debian's chromium), then tests/jax on Keras's JAX backend (one backend per process).
test: lint install-check
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile
	KERAS_BACKEND=jax $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile tests/jax

## make install-check: build the wheel, install it (not editable) with its dependencies into a fresh venv in a
## temporary directory, and use it from there: tests/install_smoke.py, fed on stdin so the checkout is not on sys.path.
install-check: $(BIN)/.installed
	rm -rf build/wheel && $(BIN)/pip wheel -q --no-deps -w build/wheel .
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/pip" install -q --no-compile build/wheel/keras_vg-*.whl && \
	cd "$$tmp" && TF_CPP_MIN_LOG_LEVEL=3 "$$tmp/venv/bin/python" - "$(CURDIR)" < "$(CURDIR)/tests/install_smoke.py"

## make demo: train the examples with the monitor (exploding_rnn also with keras_vg.AutoClip, whose
## clipping events the dashboard shows), print a report, then serve TensorBoard on 127.0.0.1.
## Each run starts afresh: a second demo would otherwise add its events to the first one's.
demo: $(BIN)/.installed
	rm -rf $(LOGDIR)/quickstart $(LOGDIR)/vanishing $(LOGDIR)/dying_relu $(LOGDIR)/exploding_rnn
	$(BIN)/python examples/quickstart.py --log-dir $(LOGDIR)/quickstart
	$(BIN)/python examples/vanishing_mlp.py --log-dir $(LOGDIR)/vanishing
	$(BIN)/python examples/dying_relu.py --log-dir $(LOGDIR)/dying_relu
	$(BIN)/python examples/exploding_rnn.py --log-dir $(LOGDIR)/exploding_rnn
	$(BIN)/keras-vg report $(LOGDIR)/quickstart
	@echo "TensorBoard: http://127.0.0.1:$(PORT)/#keras_vg"
	$(BIN)/tensorboard --logdir $(LOGDIR) --host 127.0.0.1 --port $(PORT) --samples_per_plugin=keras_vg=0

lint: $(BIN)/.installed
	$(BIN)/ruff check keras_vg tb_plugin tests examples benchmarks

clean:
	rm -rf $(VENV) $(LOGDIR) test-artifacts *.egg-info
