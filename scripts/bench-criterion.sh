#!/usr/bin/env bash
# Micro-benchmarks of the hot pure code (benches/hot.rs, criterion): wire decode of a 16 KiB
# piece message, the picker's next request with 10,000 pieces and 50 peers, piece-cache get and
# insert, SHA-1 of a 256 KiB piece. Prints one line per benchmark: its time per iteration
# (criterion's estimate, with the low and high of its confidence interval) and, where it has one,
# the throughput. No network. Asserts nothing.
#
#   scripts/bench-criterion.sh
#   BENCH_FILTER=picker scripts/bench-criterion.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cargo bench --quiet --bench hot -- --noplot ${BENCH_FILTER:-} 2>&1 |
    awk '
        /change:/ { skip = 1; next }
        /^$/ || /^[^ ]/ { skip = 0 }
        skip { next }
        /^[a-z].*time:/ { name = $0; sub(/ +time:.*/, "", name); sub(/ +time: +/, "  time: "); print; next }
        /^[a-z]/ && !/^(Benchmarking|Found|Gnuplot|Warning)/ { name = $0; next }
        /^ +time:/ { sub(/^ +time: +/, ""); print name "  time: " $0; next }
        /^ +thrpt:/ { sub(/^ +thrpt: +/, ""); print name "  thrpt: " $0 }
    '
