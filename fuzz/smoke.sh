#!/usr/bin/env bash
# Fuzz smoke test for CI: builds each fuzz target (`decode`: the packet
# decoder; `engine`: packet sequences through the session engine) and runs
# it for a bounded time over a scratch copy of its committed seed corpus
# (so the run never modifies fuzz/corpus/). Exits non-zero on any crash,
# assertion failure, timeout or out-of-memory.
#
#   fuzz/smoke.sh [SECONDS]     (default 60, per target; works from any directory)
#
# Environment:
#   FUZZ_TARGET_DIR  cargo target dir for the fuzz build
#                    (default: $HOME/.cache/ferrymq/fuzz-target)
#   FUZZ_SANITIZER   cargo-fuzz sanitizer: address (default) or none.
#                    AddressSanitizer watches the codec's one unsafe block
#                    and everything it calls; `none` runs about 3x more
#                    executions per second for longer local campaigns.
#   FUZZ_KEEP        if set, keep the scratch directory even when all is well
#   FUZZ_TARGETS     the targets to run (default: "decode engine")
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). On a stable
# toolchain RUSTC_BOOTSTRAP=1 is set so that cargo-fuzz's -Z flags work.
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: $0 [SECONDS]   (SECONDS: a positive whole number, default 60)" >&2
    exit 2
fi

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target_dir="${FUZZ_TARGET_DIR:-$HOME/.cache/ferrymq/fuzz-target}"
targets="${FUZZ_TARGETS:-decode engine}"
sanitizer="${FUZZ_SANITIZER:-address}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "error: cargo-fuzz is not installed (the 'cargo fuzz' subcommand is missing)." >&2
    echo "       Install it with: cargo install cargo-fuzz --locked" >&2
    exit 127
fi

# cargo-fuzz passes -Z flags (sanitizers, coverage options) to rustc and
# cargo; a stable toolchain accepts them only with RUSTC_BOOTSTRAP=1.
if ! rustc --version | grep -q -- '-nightly'; then
    export RUSTC_BOOTSTRAP=1
fi

scratch="$(mktemp -d "${TMPDIR:-/tmp}/ferrymq-fuzz.XXXXXX")"
status=1
cleanup() {
    if [ "$status" -eq 0 ] && [ -z "${FUZZ_KEEP:-}" ]; then
        rm -rf "$scratch"
    else
        echo "smoke.sh: scratch directory kept: $scratch" >&2
    fi
}
trap cleanup EXIT

run_target() {
    local target=$1
    mkdir -p "$scratch/$target/corpus" "$scratch/$target/artifacts"
    cp -R "$fuzz_dir/corpus/$target/." "$scratch/$target/corpus/"
    echo "smoke.sh: building fuzz target '$target' (sanitizer $sanitizer, target dir $target_dir)"
    build_start=$SECONDS
    cargo fuzz build --fuzz-dir "$fuzz_dir" --target-dir "$target_dir" --sanitizer "$sanitizer" "$target"
    echo "smoke.sh: build took $((SECONDS - build_start))s; fuzzing for ${seconds}s over $(find "$scratch/$target/corpus" -type f | wc -l) seeds"

    set +e
    cargo fuzz run --fuzz-dir "$fuzz_dir" --target-dir "$target_dir" --sanitizer "$sanitizer" \
        "$target" "$scratch/$target/corpus" -- \
        -max_total_time="$seconds" \
        -timeout=30 \
        -rss_limit_mb=2048 \
        -artifact_prefix="$scratch/$target/artifacts/" \
        -print_final_stats=1
    rc=$?
    set -e

    if [ "$rc" -ne 0 ]; then
        echo "smoke.sh: FAILED: the fuzzer exited with status $rc" >&2
        for artifact in "$scratch/$target"/artifacts/*; do
            [ -f "$artifact" ] || continue
            echo "smoke.sh: input $(basename "$artifact"): $(od -An -v -tx1 "$artifact" | tr -d ' \n')" >&2
        done
        echo "smoke.sh: reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir $fuzz_dir --sanitizer $sanitizer $target <artifact>" >&2
        status=$rc
        exit "$rc"
    fi
    echo "smoke.sh: $target: no crash in ${seconds}s"
}

cd "$fuzz_dir/.."
for target in $targets; do
    run_target "$target"
done
status=0
echo "smoke.sh: OK: no crash in any target"
