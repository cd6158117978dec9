#!/usr/bin/env bash
# Runs one cargo-fuzz target for a while: scripts/fuzz.sh TARGET [SECONDS] [libFuzzer flags...]
# Starts from fuzz/corpus/TARGET and the committed seeds and crashers in tests/corpus/TARGET;
# a crash lands in fuzz/artifacts/TARGET/ (copy it to tests/corpus/TARGET/ to keep it as a
# regression test; scripts/fuzz_smoke.sh does that for every target). FUZZ_SANITIZER as there.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/fuzz.sh TARGET [SECONDS] [libFuzzer flags...]}
seconds=${2:-60}
shift $(($# < 2 ? $# : 2))
cargo fuzz --version 2>/dev/null | grep -q 0.13.2 || cargo install cargo-fuzz --version 0.13.2 --locked
mkdir -p "fuzz/corpus/$target" "tests/corpus/$target"
cd fuzz
cargo +nightly fuzz run -s "${FUZZ_SANITIZER:-none}" "$target" "corpus/$target" "../tests/corpus/$target" -- \
    -max_total_time="$seconds" "$@"
