# crosskd developer commands. `make demo` and `make test` create .venv on first use and reuse it afterwards.
VENV = .venv
PYTHON = $(VENV)/bin/python
STAMP = $(VENV)/.crosskd-installed

.PHONY: .venv demo test test-fast lint compare

.venv: $(STAMP)

# Create the virtual environment only when it is missing; pin the torch build this project is tested with.
$(PYTHON):
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install torch==2.14.1 torchvision==0.29.1

# (Re)install crosskd in editable mode whenever pyproject.toml is newer than the stamp. The dev extra holds every
# optional one: demo (the digits data of `make demo`), tensorboard, openvino, cocoeval (faster-coco-eval), tests, lint.
$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: .venv
	$(PYTHON) scripts/demo.py

# Everything, the slow tests included (CI). Both test targets install the Ultralytics peer first (`compare`, below).
test: .venv compare
	$(PYTHON) -m pytest -q tests

# Everything but the tests marked slow (overfit, torchrun, kill-and-resume, CLI matrix, full-size models): 1,206 tests.
test-fast: .venv compare
	$(PYTHON) -m pytest -q -m "not slow" tests

lint: .venv
	$(VENV)/bin/ruff check .

# Ultralytics 8.4.190 as a project-local peer for the equality tests (tests/ultralytics_peer.py): installed into
# .compare/ without its dependencies, plus the pure ones crosskd's venv lacks. Only the tests' subprocesses put it
# on PYTHONPATH, so crosskd itself can never import ultralytics.
COMPARE = .compare
COMPARE_STAMP = $(COMPARE)/.installed
COMPARE_PACKAGES = ultralytics==8.4.190 ultralytics-thop==2.2.3 polars==2.1.0 polars-runtime-32==2.1.0 \
	requests==2.34.2 urllib3==2.8.0 idna==3.21 charset-normalizer==3.5.3 certifi==2026.10.19.post1

compare: $(COMPARE_STAMP)

$(COMPARE_STAMP): | $(PYTHON)
	$(PYTHON) -m pip install --quiet --target $(COMPARE) --no-deps $(COMPARE_PACKAGES)
	touch $(COMPARE_STAMP)
