#!/usr/bin/env bash
# DHT lookup hops against network size: n = 64, 256, 1024, 4096 nodes of our real DHT core
# (core::dht::Dht) in one process, datagrams routed in memory with 25 ms each way (50 ms RTT per
# hop) on a simulated clock, beside log2(n) and beside the ring without shortcuts of the course
# notes on the same node ids (each node knows its two successors; a lookup walks clockwise to the
# key's owner): O(log n) against O(n). Then the same lookups after 10%, 30% and 50% of the nodes
# leave: success rate and hops for both. 500 lookups per size (each for its own announced
# info-hash), 4 networks per size (all up, then one per leave level, each built from the same seed).
#
# No sockets, no network at all: examples/dht_sim.rs does the work. Prints figures, asserts
# nothing, and plots hops vs n to target/bench/dht-hops.png with gnuplot (installed with apt-get
# when missing and running as root; without it the plot is skipped with a note).
#
#   scripts/bench-dht.sh
#   LOOKUPS=200 SIZES=64,256,1024,4096,16384 scripts/bench-dht.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LOOKUPS=${LOOKUPS:-500}
SIZES=${SIZES:-64,256,1024,4096}
LEAVE=${LEAVE:-10,30,50}
out=target/bench
mkdir -p "$out"
data=$out/dht-hops.dat
png=$out/dht-hops.png

echo "bench-dht: building (release)"
cargo build --release --quiet --example dht_sim
sim=${CARGO_TARGET_DIR:-target}/release/examples/dht_sim
"$sim" --sizes "$SIZES" --lookups "$LOOKUPS" --lookups-large "$LOOKUPS" --leave "$LEAVE" --data "$data"

if ! command -v gnuplot >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bench-dht: installing gnuplot-nox for the plot"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox; } >/dev/null 2>&1 || true
fi
if ! command -v gnuplot >/dev/null; then
    echo "bench-dht: gnuplot is not available (apt-get install gnuplot-nox): plot skipped; the figures are in $data"
    exit 0
fi
gnuplot <<EOF
if (strstrt(GPVAL_TERMINALS, "pngcairo") > 0) {
    set terminal pngcairo size 900,600 font "sans,11"
} else {
    set terminal png size 900,600
}
set output "$png"
set title "Lookup hops vs network size (in-process simulation, all nodes up)"
set xlabel "nodes (n)"
set ylabel "hops per lookup (mean)"
set logscale xy 2
set key top left
set grid
plot "$data" using 1:4 with linespoints lw 2 pt 5 title "ring, two successors (O(n))", \
     "$data" using 1:2 with lines lw 1 dt 2 title "log2(n)", \
     "$data" using 1:3 with linespoints lw 2 pt 7 title "mainline DHT, k-buckets (O(log n))"
EOF
echo "bench-dht: plot written to $png"
