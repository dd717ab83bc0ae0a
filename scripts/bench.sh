#!/usr/bin/env bash
# Every benchmark in one go: runs each scripts/bench-*.sh (so a new one joins by its name), or
# only those named (`scripts/bench.sh engine mount`), prints each one's tables and writes a full
# report, with the machine, the versions and the date, to target/bench/report-DATE.md beside the
# plots the benchmarks draw there (target/bench/*.png).
#
# These 2 cores are shared and noisy (one throughput run varies by +-50%), so every figure is
# the median of RUNS runs (default 3) with its min and max: a benchmark that takes RUNS itself
# (its header says so) is run once with RUNS set; any other is run RUNS times and its outputs
# merged by scripts/bench_median.py (each number that varies becomes "median (min-max)").
# Asserts nothing; exits non-zero if a benchmark could not run (the others still run).
#
#   scripts/bench.sh                      # all of them (an hour or more)
#   RUNS=5 scripts/bench.sh distribution tree
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
RUNS=${RUNS:-3}
out=$repo/${CARGO_TARGET_DIR:-target}/bench
mkdir -p "$out"
stamp=$(date -u +%Y-%m-%dT%H%MZ)
report=$out/report-$stamp.md

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for f in scripts/bench-*.sh; do
        n=${f#scripts/bench-}
        names+=("${n%.sh}")
    done
fi

echo "bench: building (release)"
cargo build --release --quiet --bin swarmfs || exit 1
export SWARMFS=$repo/${CARGO_TARGET_DIR:-target}/release/swarmfs
export OUT=$out

version() { "$@" 2>&1 | head -1; }
{
    echo "# swarmfs benchmarks, $stamp"
    echo
    echo "- commit: $(git describe --always --dirty 2>/dev/null || echo unknown)"
    echo "- machine: $(uname -srm); $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)); $(free -g | awk '/^Mem:/ {print $2}') GiB"
    echo "- $(version rustc --version); $(version "$SWARMFS" --version)"
    echo "- aria2c: $(version aria2c --version); libtorrent: $(/usr/bin/python3 -c 'import libtorrent; print(libtorrent.__version__)' 2>/dev/null || echo none); btfs: $(dpkg-query -W -f '${Version}' btfs 2>/dev/null || echo none)"
    echo "- figures: median (min-max) of $RUNS runs"
} >"$report"

status=0
for name in "${names[@]}"; do
    script=scripts/bench-$name.sh
    [ -x "$script" ] || { echo "bench: no $script" >&2; status=1; continue; }
    echo
    echo "=== $name"
    runs_dir=$(mktemp -d)
    if sed -n '1,30p' "$script" | grep -q 'RUNS'; then
        RUNS=$RUNS "$script" 2>&1 | tee "$runs_dir/merged"
        rc=${PIPESTATUS[0]}
    else
        rc=0
        for i in $(seq "$RUNS"); do
            echo "--- $name: run $i of $RUNS"
            "$script" >"$runs_dir/run$i" 2>&1 || rc=$?
            tail -n 40 "$runs_dir/run$i"
        done
        /usr/bin/python3 scripts/bench_median.py "$runs_dir"/run* >"$runs_dir/merged"
        echo "--- $name: merged"
        cat "$runs_dir/merged"
    fi
    [ "$rc" = 0 ] || { echo "bench: $name failed (exit $rc)" >&2; status=1; }
    {
        echo
        echo "## $name"
        echo
        echo '```'
        cat "$runs_dir/merged"
        echo '```'
    } >>"$report"
    rm -rf "$runs_dir"
done
{
    echo
    echo "Plots: $(cd "$out" && ls *.png 2>/dev/null | tr '\n' ' ')"
} >>"$report"
echo
echo "bench: report in $report"
exit $status
