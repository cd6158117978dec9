#!/usr/bin/env bash
# A short fuzz run of every cargo-fuzz target, for CI: scripts/fuzz_smoke.sh [TARGET...]
#
# Builds all targets once (nightly, cargo-fuzz), then runs each for FUZZ_SECONDS, starting
# from fuzz/corpus/<target> (kept between local runs, git-ignored) and the committed seeds
# and crashers in tests/corpus/<target>. A crash (or timeout, or out-of-memory) is copied to
# tests/corpus/<target>/, where tests/fuzz_corpus.rs replays it as an ordinary test from
# then on; the script then exits non-zero. Last line:
#   fuzz: targets=N seconds_per_target=S new_crashers=0
#
# Environment:
#   FUZZ_SECONDS     seconds per target (default 30)
#   FUZZ_TIMEOUT     seconds one input may take before it counts as a hang (default 20)
#   FUZZ_SANITIZER   none (default: faster build and runs) or address
#   FUZZ_TARGET_DIR  cargo target directory (default fuzz/target)
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds=${FUZZ_SECONDS:-30}
timeout_s=${FUZZ_TIMEOUT:-20}
sanitizer=${FUZZ_SANITIZER:-none}
target_dir=${FUZZ_TARGET_DIR:-fuzz/target}
case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: needs a nightly toolchain (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi

flags=(-s "$sanitizer" --target-dir "$target_dir")
started=$(date +%s)
(cd fuzz && cargo +nightly fuzz build "${flags[@]}")
echo "fuzz: built ${#targets[@]} targets in $(($(date +%s) - started)) s"

new_crashers=0
log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" "tests/corpus/$t"
    before=$(ls "fuzz/artifacts/$t" | sort)
    status=0
    (cd fuzz && cargo +nightly fuzz run "${flags[@]}" "$t" "corpus/$t" "../tests/corpus/$t" -- \
        -max_total_time="$seconds" -timeout="$timeout_s" -print_final_stats=1) \
        >"$log_dir/$t.log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log_dir/$t.log" | tail -1)
    found=$(comm -13 <(echo "$before") <(ls "fuzz/artifacts/$t" | sort) | grep -E '^(crash|oom|timeout|leak)-' || true)
    n=0
    for f in $found; do
        cp "fuzz/artifacts/$t/$f" "tests/corpus/$t/$f"
        n=$((n + 1))
    done
    if [ "$status" -ne 0 ] && [ "$n" -eq 0 ]; then
        # Failed without leaving an input behind (a build or harness problem): show why.
        tail -n 30 "$log_dir/$t.log" >&2
        n=1
    fi
    if [ "$n" -gt 0 ]; then
        grep -E 'panicked|ERROR|SUMMARY' "$log_dir/$t.log" | head -n 5 >&2 || true
        echo "fuzz: $t: $n new crasher(s) copied to tests/corpus/$t/: $found" >&2
    fi
    new_crashers=$((new_crashers + n))
    echo "fuzz: target=$t runs=${runs:-0} execs_per_s=$(( ${runs:-0} / (seconds > 0 ? seconds : 1) )) crashers=$n"
done
echo "fuzz: targets=${#targets[@]} seconds_per_target=$seconds new_crashers=$new_crashers"
[ "$new_crashers" -eq 0 ]
