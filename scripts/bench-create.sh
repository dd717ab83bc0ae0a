#!/usr/bin/env bash
# Benchmark: `swarmfs create` on a 1 GiB file against `sha1sum` of the same file and against
# `mktorrent -t 2`, in one run, all from the page cache (the file is read once before timing).
# Each tool runs REPEAT times, interleaved; the best time of each is reported.
#
#   scripts/bench-create.sh                 # builds the release binary first
#   SWARMFS_BIN=path/to/swarmfs SIZE_MIB=256 REPEAT=5 scripts/bench-create.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${SIZE_MIB:-1024}
REPEAT=${REPEAT:-3}
for tool in sha1sum mktorrent awk; do
    command -v "$tool" >/dev/null || { echo "bench-create: $tool is missing (scripts/test.sh installs it)" >&2; exit 1; }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-create.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

if [ -z "${SWARMFS_BIN:-}" ]; then
    cargo build --release --quiet --bin swarmfs
    # Copy it at once: a shared target directory may be rebuilt by someone else meanwhile.
    cp "${CARGO_TARGET_DIR:-target}/release/swarmfs" "$tmp/swarmfs"
    SWARMFS_BIN=$tmp/swarmfs
fi

data=$tmp/data.bin
echo "writing ${SIZE_MIB} MiB of random data to $data ..."
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom >"$data"
cat "$data" >/dev/null # warm the page cache

TIMEFORMAT=%R
seconds() { { time "$@" >/dev/null 2>&1; } 2>&1; }
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (b == "" || a < b) ? a : b }'; }

best_swarmfs= best_sha1sum= best_mktorrent=
for _ in $(seq "$REPEAT"); do
    rm -f "$tmp/s.torrent" "$tmp/m.torrent"
    t=$(seconds "$SWARMFS_BIN" create "$data" -o "$tmp/s.torrent" --piece-length 256KiB)
    best_swarmfs=$(min "$t" "$best_swarmfs")
    t=$(seconds sha1sum "$data")
    best_sha1sum=$(min "$t" "$best_sha1sum")
    t=$(seconds mktorrent -t 2 -l 18 -a http://127.0.0.1:6969/announce -o "$tmp/m.torrent" "$data")
    best_mktorrent=$(min "$t" "$best_mktorrent")
done
[ -s "$tmp/s.torrent" ] || { echo "bench-create: swarmfs create failed" >&2; exit 1; }

echo
echo "$(nproc) cores, ${SIZE_MIB} MiB file in the page cache, 256 KiB pieces, best of $REPEAT:"
printf '  %-22s %8s  %10s\n' tool seconds MiB/s
for row in "swarmfs create:$best_swarmfs" "sha1sum:$best_sha1sum" "mktorrent -t 2:$best_mktorrent"; do
    name=${row%%:*} t=${row##*:}
    printf '  %-22s %8.3f  %10.0f\n' "$name" "$t" "$(awk -v s="$SIZE_MIB" -v t="$t" 'BEGIN { print (t > 0) ? s / t : 0 }')"
done
