#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each with cargo-fuzz, starting from the
# committed seeds, and prints one line per target: executions, corpus size, crashes.
# Usage: fuzz/run.sh SECONDS [TARGET...]        (needs a nightly toolchain and cargo-fuzz)
# A crash stops the run with libFuzzer's report; its input is in fuzz/artifacts/TARGET/: copy it
# to fuzz/regressions/TARGET/ so that `cargo test` replays it from then on.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(protocol key_id store_record file_reader provider_options)

cargo +nightly fuzz build >/dev/null
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log=$(mktemp)
    # -rss_limit_mb guards the 2-core, shared machine; -timeout catches hangs (a crash too).
    if ! cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz target $t: CRASH (input saved in fuzz/artifacts/$t/)"
        exit 1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    corpus=$(find "corpus/$t" -type f | wc -l)
    echo "fuzz target $t: ${seconds}s, $execs executions, corpus $corpus inputs, no crash"
    rm -f "$log"
done
