# Tollgate's set-up and test entry points. Every target installs what it needs, idempotently.

CARGO ?= cargo
WASM_TARGET := wasm32-wasip1

.PHONY: test setup-rust fmt-check clippy wasm unit bench bench-grpc

## The whole test suite: toolchain set-up, format, lints, the wasm build and every test.
test: setup-rust fmt-check clippy wasm unit

setup-rust:
	rustup target add $(WASM_TARGET)
	rustup component add rustfmt clippy

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

wasm:
	$(CARGO) build -p tollgate-filter --target $(WASM_TARGET) --release --locked

unit:
	$(CARGO) test --workspace --locked

## Criterion benchmarks (not part of the test suite).
bench:
	$(CARGO) bench -p tollgate --bench decisions

## ext_authz and HTTP load against the release sidecar, calibrated against a no-op server.
bench-grpc:
	bench/grpc.sh
