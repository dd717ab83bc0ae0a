#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (nightly toolchain), each for SECONDS (default 600), and
# prints executions and crashes per target. Exits non-zero if any target crashed.
#
#   scripts/fuzz.sh [-p N] [--minimize] [SECONDS] [TARGET...]
#
#   -p N         run N targets at a time (default 1; each is one libFuzzer process, one core)
#   --minimize   afterwards, merge what the run found into fuzz/corpus/<target> and minimize it
#                (libFuzzer -merge=1, as `cargo fuzz cmin` does); otherwise fuzz/corpus is only
#                read and new inputs stay in fuzz/target/fuzz-run/<target>/corpus
#   TARGET...    only these targets (default: every file in fuzz/fuzz_targets/)
#
# Crash inputs land in fuzz/artifacts/<target>/; replay one with
#   fuzz/target/x86_64-unknown-linux-gnu/release/<target> fuzz/artifacts/<target>/crash-...
# Everything runs under `nice -n 19`. Not part of scripts/test.sh: the stable test
# tests/fuzz_corpus.rs replays the committed corpora instead.
set -euo pipefail

parallel=1
minimize=0
seconds=600
targets=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -p) parallel="$2"; shift 2 ;;
        --minimize) minimize=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *[!0-9]*) targets+=("$1"); shift ;;
        *) seconds="$1"; shift ;;
    esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
fuzz="$root/fuzz"
if [[ ${#targets[@]} -eq 0 ]]; then
    for f in "$fuzz"/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# Safe Rust only, so no AddressSanitizer (about twice the executions); debug assertions and
# overflow checks stay on (cargo-fuzz's release default).
(cd "$root" && nice -n 19 cargo +nightly fuzz build --sanitizer none)
bin_dir="$fuzz/target/x86_64-unknown-linux-gnu/release"
runs="$fuzz/target/fuzz-run"

run_one() {
    local t="$1" dir="$runs/$1" rc=0
    rm -rf "$dir"
    mkdir -p "$dir/corpus" "$fuzz/artifacts/$t" "$fuzz/corpus/$t"
    # One process, one worker: -jobs/-workers are left unset, so libFuzzer fuzzes in-process.
    nice -n 19 "$bin_dir/$t" "$dir/corpus" "$fuzz/corpus/$t" \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$fuzz/artifacts/$t/" >"$dir/log" 2>&1 || rc=$?
    echo "$rc" >"$dir/rc"
}

status=0
pids=()
for t in "${targets[@]}"; do
    if [[ ! -x "$bin_dir/$t" ]]; then
        echo "no such target: $t" >&2
        exit 2
    fi
    echo "fuzzing $t for ${seconds}s" >&2
    run_one "$t" &
    pids+=($!)
    if [[ ${#pids[@]} -ge $parallel ]]; then
        wait "${pids[0]}"
        pids=("${pids[@]:1}")
    fi
done
for p in "${pids[@]}"; do wait "$p"; done

printf '%-14s %8s %12s %10s %8s\n' target seconds executions exec/s crashes
for t in "${targets[@]}"; do
    log="$runs/$t/log"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    rc=$(cat "$runs/$t/rc")
    crashes=0
    if [[ "$rc" != 0 ]]; then
        crashes=1
        status=1
    fi
    printf '%-14s %8s %12s %10s %8s\n' "$t" "${secs:-?}" "${execs:-?}" "${rate:-?}" "$crashes"
    if [[ "$rc" != 0 ]]; then
        grep -m1 -E "panicked at|ERROR: libFuzzer" "$log" >&2 || true
        grep -E "^(artifact_prefix|Test unit written)" "$log" >&2 || true
    fi
done

if [[ $minimize == 1 ]]; then
    for t in "${targets[@]}"; do
        merged="$runs/$t/merged"
        rm -rf "$merged" && mkdir -p "$merged"
        nice -n 19 "$bin_dir/$t" -merge=1 "$merged" "$fuzz/corpus/$t" "$runs/$t/corpus" \
            >"$runs/$t/merge.log" 2>&1
        rm -rf "$fuzz/corpus/$t" && mv "$merged" "$fuzz/corpus/$t"
        echo "$t: corpus $(ls "$fuzz/corpus/$t" | wc -l) files, $(du -sh "$fuzz/corpus/$t" | cut -f1)" >&2
    done
fi
exit $status
