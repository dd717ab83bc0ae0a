#!/usr/bin/env bash
# Benchmark of magnet links on 127.0.0.1: `swarmfs mount MAGNET MNT` from command start until the
# files are visible (the command returns only then), median of 5, against a local seeder that is
# the magnet's only peer (x.pe): a swarmfs seeder and a python3-libtorrent seeder. Prints
# figures; asserts nothing. Then the DHT as the only source: a bare magnet, a seeder that
# announced through a local `swarmfs dht` node. As root it runs inside a private network
# namespace with only loopback; our mounts run with --no-dht or that loopback bootstrap node. (btfs is not measured: given the same magnet, with
# x.pe or with a loopback tracker, it showed no files within 20 s in that namespace.)
#
#   scripts/bench-magnet.sh          # builds the release binary first
#   SWARMFS=path/to/swarmfs RUNS=9 scripts/bench-magnet.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
RUNS=${RUNS:-5}
LT_PYTHON=/usr/bin/python3

if [ -z "${SWARMFS:-}" ]; then
    echo "bench-magnet: building (release)"
    cargo build --release --quiet --bin swarmfs
    export SWARMFS=$repo/${CARGO_TARGET_DIR:-target}/release/swarmfs
fi
. scripts/netns.sh
if ! in_loopback_netns "$0" "$@" && [ -z "${SWARMFS_NETNS:-}" ]; then
    echo "bench-magnet: not root: running without network isolation (btfs skipped)"
fi

work=$(mktemp -d /tmp/bench-magnet.XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt" "$work/src/set"
pids=()
cleanup() {
    mountpoint -q "$mnt" 2>/dev/null && { fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt"; }
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cp "$SWARMFS" "$work/swarmfs"
SWARMFS=$work/swarmfs

head -c $((64 << 20)) /dev/urandom >"$work/src/set/video.bin"
head -c $((3 << 20)) /dev/urandom >"$work/src/set/extra.bin"
"$SWARMFS" create "$work/src/set" -o "$work/t.torrent" >/dev/null
hash=$("$SWARMFS" info --json "$work/t.torrent" | "$LT_PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["info_hash"])')

wait_for() { # FILE REGEX SECONDS
    for _ in $(seq $(($3 * 20))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
    echo "bench-magnet: timed out waiting for /$2/ in $1" >&2; cat "$1" >&2; exit 1
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Milliseconds from the command's start until MNT/set/video.bin exists (the command has returned
# and a stat sees the file), then unmounts. Fails if the files never show.
time_mount() { # CMD...
    "$LT_PYTHON" - "$mnt" "$@" <<'PY'
import os, subprocess, sys, time
mnt, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while not os.path.exists(os.path.join(mnt, "set", "video.bin")):
    if time.perf_counter() - t0 > 60:
        p.kill()
        print("none")  # not visible within 60 s
        sys.exit(0)
    time.sleep(0.002)
print("%.0f" % ((time.perf_counter() - t0) * 1000))
try:
    p.wait(timeout=5)  # swarmfs returns once mounted; btfs stays in the background
except subprocess.TimeoutExpired:
    pass
PY
    fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt"
    sleep 0.3
}

run_series() { # LABEL CMD...
    local label=$1; shift
    local all=() t
    for _ in $(seq "$RUNS"); do
        t=$(time_mount "$@")
        if [ "$t" = none ]; then
            printf '  %-34s files not visible within 60 s\n' "$label"
            return
        fi
        all+=("$t")
    done
    printf '  %-34s median %5s ms   (runs: %s)\n' "$label" "$(printf '%s\n' "${all[@]}" | median)" "${all[*]}"
}

"$SWARMFS" seed "$work/t.torrent" -d "$work/src" --listen 127.0.0.1:0 --no-dht >"$work/seed.out" 2>"$work/seed.err" &
pids+=($!)
wait_for "$work/seed.out" '^seeding' 60
addr=$(grep -o 'listening on [^ ]*' "$work/seed.out" | head -1 | cut -d' ' -f3)
magnet="magnet:?xt=urn:btih:$hash&dn=set&x.pe=$addr"

echo "bench-magnet: magnet mount, command start -> files visible, $RUNS runs each (64 MiB torrent)"
run_series "swarmfs mount <- swarmfs seeder" "$SWARMFS" mount "$magnet" "$mnt" --no-dht --listen 127.0.0.1:0 --log-file "$work/mount.log"

# The DHT as the only source: a bare magnet (no x.pe, no tracker); a swarmfs seeder announced
# through a local bootstrap node, which every mount (a fresh DHT node) joins through.
"$SWARMFS" dht --listen 127.0.0.2:0 --dht-rate-limit 0 >"$work/dht.out" 2>"$work/dht.err" &
pids+=($!)
wait_for "$work/dht.out" '^dht node listening' 30
boot=$(grep -o 'listening on [^ ]*' "$work/dht.out" | head -1 | cut -d' ' -f3)
"$SWARMFS" seed "$work/t.torrent" -d "$work/src" --listen 127.0.0.3:0 --dht-bootstrap "$boot" \
    --dht-announce-interval 1 >"$work/seed-dht.out" 2>"$work/seed-dht.err" &
pids+=($!)
wait_for "$work/seed-dht.out" '^seeding' 60
sleep 2 # a few announces
run_series "swarmfs mount <- DHT only" "$SWARMFS" mount "magnet:?xt=urn:btih:$hash&dn=set" "$mnt" \
    --listen 127.0.0.4:0 --dht-bootstrap "$boot" --log-file "$work/mount-dht.log"

if "$LT_PYTHON" -c 'import libtorrent' 2>/dev/null; then
    "$LT_PYTHON" "$repo/tests/fixtures/lt_client.py" seed "$work/t.torrent" "$work/src" >"$work/lt.out" 2>&1 &
    pids+=($!)
    wait_for "$work/lt.out" '^seeding' 60
    lt_addr=$(grep -o 'listening on [^ ]*' "$work/lt.out" | head -1 | cut -d' ' -f3)
    lt_magnet="magnet:?xt=urn:btih:$hash&dn=set&x.pe=$lt_addr"
    run_series "swarmfs mount <- libtorrent seeder" "$SWARMFS" mount "$lt_magnet" "$mnt" --no-dht --listen 127.0.0.1:0 --log-file "$work/mount-lt.log"
else
    echo "  libtorrent seeder: skipped (python3-libtorrent missing)"
fi
