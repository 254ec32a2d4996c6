# alpipe: `make demo` runs the experiment, `make test` runs the tests; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Reinstall when the dependency list changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Label Studio, for the end-to-end test of its ML-backend protocol (tests/e2e/test_label_studio.py), in
# its own virtualenv: its pins (Django and friends) are not alpipe's.
LS_VENV := .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed
$(LS_STAMP):
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet label-studio==1.23.2
	touch $(LS_STAMP)

.PHONY: setup labelstudio demo demo-local demo-photos test test-fast bench chaos lint up clean

setup: $(STAMP)

labelstudio: $(LS_STAMP)

# The experiment through the live services: a local redis-server, the API, two trainers and two
# scorers start, the simulated oracle labels over HTTP, and everything stops at the end.
DEMO_OUT ?= runs/demo
demo: setup
	$(BIN)/alpipe simulate --stack --scorers 2 --trainers 2 --dataset mnist5k --strategies auto,margin,random \
		--seeds 3 --initial 20 --query-size 10 --budget 300 --model small_cnn --out $(DEMO_OUT)

# The same experiment in one process, no services.
demo-local: setup
	$(BIN)/alpipe simulate --dataset mnist5k --strategies auto,margin,random \
		--seeds 3 --initial 20 --query-size 10 --budget 300 --model small_cnn --out runs/demo-local

# Real photographs: the photo set (2,000 colour patches of 8 photos) through the live services in
# embedding mode: the scorers embed every image once (EfficientNet-Lite0), then every round trains and
# scores only a head. About three minutes on 2 cores.
demo-photos: setup
	$(BIN)/alpipe simulate --stack --scorers 2 --trainers 1 --dataset photos --strategies auto,random \
		--seeds 3 --initial 20 --query-size 10 --budget 100 --out runs/demo-photos

up: setup
	$(BIN)/alpipe up --scorers 2

test: setup labelstudio lint
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q tests/unit

# The label-efficiency bench's peer column runs baal's own loop (bench/peer_baal.py). Installed without
# its declared dependencies: baal 2.1.0 also declares jupyter (about 60 packages) that the bench never imports.
# py-spy profiles an API worker in bench.api_load.
BENCH_DEPS := baal==2.1.0 structlog==22.3.0 torchmetrics==1.9.0 lightning-utilities==0.15.3 py-spy==0.4.3
bench: setup
	$(BIN)/pip install --quiet --no-deps $(BENCH_DEPS)
	$(BIN)/python -m bench.label_efficiency
	$(BIN)/python -m bench.services
	$(BIN)/python -m bench.api_load
	$(BIN)/python -m bench.embeddings

# The services under faults (bench/chaos.py): 20 labelers, 100 faults of every kind on each backend, the
# promises checked at the end. About 6 minutes per backend on 2 cores; `make test` runs a short version.
chaos: setup
	$(BIN)/python -m bench.chaos --backend local,s3 --labelers 20 --faults 100

lint: setup
	$(BIN)/ruff check shared services tests bench

clean:
	rm -rf $(VENV) $(LS_VENV) runs data .pytest_cache
