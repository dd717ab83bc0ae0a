#!/usr/bin/env bash
# The distribution-time experiment (issue 11): how close a loopback swarm of swarmfs peers comes
# to the peer-to-peer lower bound for distributing a file of size F to N peers, and how far it
# leaves client-server behind. One seeder (upload cap u_s), N leechers (upload cap u_i,
# download unlimited), the built-in tracker, each process on its own 127.0.0.x, --no-dht; the
# seeder's start is the common start signal (the leechers are up and connected to each other
# first, with nothing to trade). For N in 1 2 4 8 16 32 it prints, with the median (min-max) of
# RUNS runs: the measured time until every leecher holds a verified copy, the P2P bound
# max(F/u_s, N*F/(u_s + sum u_i)), their ratio; the client-server baseline (leechers with
# --no-upload, never unchoking) for N <= CS_MAX_N against N*F/u_s; how the upload was shared
# (seeder's and leechers' bytes uploaded in units of F; the fraction of the run each upload link
# was busy, bytes / (cap * time); the median leecher's bytes received straight from the seeder, in F). A second table gives half the leechers a quarter of the
# upload. Plots go to OUT (default target/bench/): distribution.png, distribution-heterogeneous.png
# (gnuplot; installed when root and missing). Asserts nothing; the last line is
#   p2p_ratio_max=<x> cs_ratio_max=<y>
# (the worst ratios of the homogeneous table).
#
#   scripts/bench-distribution.sh
#   RUNS=1 NS="1 8 32" CS_MAX_N=4 F_MIB=32 US_MIB=4 UI_MIB=4 scripts/bench-distribution.sh
#   TABLES=homogeneous PEER_ARGS="--upload-slots 2" NS=32 RUNS=1 scripts/bench-distribution.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export OUT=${OUT:-$repo/target/bench}

if [ -z "${SWARMFS:-}" ]; then
    echo "bench-distribution: building (release)"
    cargo build --release --quiet --bin swarmfs
    export SWARMFS=$repo/${CARGO_TARGET_DIR:-target}/release/swarmfs
fi
if ! command -v gnuplot >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bench-distribution: installing gnuplot"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox; } \
        >/dev/null 2>&1 || echo "bench-distribution: gnuplot not installed: no plots"
fi
. scripts/netns.sh
in_loopback_netns "$0" "$@" || echo "bench-distribution: not root: running without network isolation"

# Leechers' data on tmpfs, so the disk's noise stays out of the figures.
base=/dev/shm
[ -w "$base" ] || base=${TMPDIR:-/tmp}
work=$(mktemp -d "$base/bench-distribution.XXXXXX")
trap 'rm -rf "$work"' EXIT
# A private copy: a shared target directory may be rebuilt by someone else during the run.
cp "$SWARMFS" "$work/swarmfs"
ulimit -n 65536 2>/dev/null || true
/usr/bin/python3 scripts/distribution.py "$work/swarmfs" "$work" "$OUT"
