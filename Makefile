# The two commands a newcomer runs (see README):
#   make run   - create .venv, install pinned dependencies, train a small model on a local Ray cluster
#   make test  - create .venv, install pinned dependencies, lint and run the test suite
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: setup run test lint bench clean

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -d /usr/share/datasets/fashion-mnist || ( (command -v apt-get >/dev/null && \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) ) || \
	  echo "note: could not install the Debian package dataset-fashion-mnist; pass --data-dir to sazd train" )
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements.lock
	$(VPY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VPY) -m sazd train --model mlp --dataset fashion-mnist --code sazd --n 6 --k 4 --scheme deu \
	  --backend ray --epochs 1 --train-limit 6000 --stragglers 1 --json runs/last.json

lint: setup
	$(VPY) -m ruff check src tests

test: setup lint
	$(VPY) -m pytest -q

bench: setup
	$(VPY) -m sazd bench codec
	$(VPY) -m sazd bench stability

clean:
	rm -rf $(VENV) runs bench-out .pytest_cache .ruff_cache .hypothesis
