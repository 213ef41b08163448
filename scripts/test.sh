#!/usr/bin/env bash
# The whole test suite: unit, property, end-to-end and interoperability
# tests, doc tests, benchmarks and examples built and run once in test
# mode, and short fuzzing smoke runs of the packet decoder and the session engine.
#
#   scripts/test.sh            # everything (installs missing test tools first)
#   FUZZ_SECONDS=0 scripts/test.sh   # skip the fuzz smoke
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferrymq/target}"
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"

scripts/install-test-deps.sh

step() { printf '\n== %s\n' "$*"; }

step "build: tests, benches and examples (one profile)"
cargo build --workspace --all-targets --locked

step "build: the rumqttd runner of the load harness (a cargo project of its own)"
CARGO_TARGET_DIR="$CARGO_TARGET_DIR/peers" \
  cargo build --manifest-path benches/rumqttd/Cargo.toml --locked

step "tests"
cargo nextest run --workspace --all-targets --locked --no-fail-fast

step "doc tests"
# Cargo resolves features for doc tests without the root package's
# dev-dependencies (it has no library), so a cold target dir compiles
# RocksDB a second time here (about 8 minutes on 2 cores; a cold .ci/run
# took 19 minutes in all on 2026-11-26, a warm one 43 s).
cargo test --workspace --doc --locked

if [ "$FUZZ_SECONDS" != 0 ]; then
  step "fuzz smoke: the decoder and the session engine, ${FUZZ_SECONDS}s each"
  fuzz/smoke.sh "$FUZZ_SECONDS"
fi
step "all tests passed"
