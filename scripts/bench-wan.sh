#!/usr/bin/env bash
# Benchmark of the mount over emulated WAN links: N seeders, each reached only through its own
# proxy (examples/wan_proxy.rs) that holds every byte D ms each way and caps the seeder's upload
# at U bytes/s with a deep buffer. The seeders do not announce; the proxies announce themselves
# to a local tracker, so the mount only ever reaches seeders through them. Seeders are swarmfs
# and python3-libtorrent (uTP off), separately; btfs (Debian's, on the libtorrent seeders) in the
# same run. All on 127.0.0.x, inside a loopback-only network namespace when root. Prints figures
# per profile; asserts nothing.
#   - sequential read of SEQ_MIB through a fresh mount: MB/s against the aggregate cap, and bytes
#     the proxies sent per byte read;
#   - the first 4 KiB at DEEP_MIB on a fresh mount, timed from the read issued right after
#     `mount` returns;
#   - RANDOM_READS random 4 KiB reads on that mount with the background fill running: p50/p99/max.
#
#   scripts/bench-wan.sh                                   # all profiles, 1 GiB file
#   PROFILES="4x4MiB/50" SIZE_MIB=256 SEQ_MIB=64 scripts/bench-wan.sh
#   (a profile is SEEDERSxRATE/RTT_MS; KINDS="swarmfs libtorrent btfs" picks the seeders/clients)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PROFILES=${PROFILES:-"4x4MiB/50 8x1MiB/100 1x8MiB/200"}
KINDS=${KINDS:-"swarmfs libtorrent btfs"}
SIZE_MIB=${SIZE_MIB:-1024}
SEQ_MIB=${SEQ_MIB:-256}
DEEP_MIB=${DEEP_MIB:-700}
RANDOM_READS=${RANDOM_READS:-64}
LT_PYTHON=/usr/bin/python3

if [ -z "${SWARMFS:-}" ]; then
    echo "bench-wan: building (release)"
    cargo build --release --quiet --bin swarmfs --example wan_proxy
    export SWARMFS=$repo/${CARGO_TARGET_DIR:-target}/release/swarmfs
    export WAN_PROXY=$repo/${CARGO_TARGET_DIR:-target}/release/examples/wan_proxy
fi
: "${WAN_PROXY:=$(dirname "$SWARMFS")/examples/wan_proxy}"
. scripts/netns.sh
if ! in_loopback_netns "$0" "$@" && [ -z "${SWARMFS_NETNS:-}" ]; then
    echo "bench-wan: not root: no network isolation; btfs skipped"
    KINDS=${KINDS//btfs/}
fi
"$LT_PYTHON" -c 'import libtorrent' 2>/dev/null || { KINDS=${KINDS//libtorrent/}; KINDS=${KINDS//btfs/}; }
command -v btfs >/dev/null || KINDS=${KINDS//btfs/}

work=$(mktemp -d /tmp/bench-wan.XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt" "$work/src"
pids=()
cleanup() {
    mountpoint -q "$mnt" 2>/dev/null && { fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt"; }
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
probe() { "$LT_PYTHON" "$repo/scripts/read_probe.py" "$@"; }
wait_for() { # FILE REGEX SECONDS
    for _ in $(seq $(($3 * 20))); do grep -qE "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
    echo "bench-wan: timed out waiting for /$2/ in $1" >&2; cat "$1" >&2; exit 1
}
stop_all() { # the seeders, proxies and tracker of one series
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
unmount() {
    fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" 2>/dev/null || true
    sleep 0.3
}

echo "bench-wan: making a ${SIZE_MIB} MiB file"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$work/src/data.bin"
"$SWARMFS" create "$work/src/data.bin" -o "$work/t.torrent" >/dev/null
hash=$("$SWARMFS" info --json "$work/t.torrent" | "$LT_PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["info_hash"])')
deep=$((DEEP_MIB << 20)); [ "$deep" -lt $(((SIZE_MIB << 20) - 4096)) ] || deep=$(((SIZE_MIB << 20) / 3 * 2))
tracker_port=6970
tracker=http://127.0.0.1:$tracker_port/announce
# btfs reads trackers from the torrent: the same info dictionary, with the tracker in it.
"$SWARMFS" create "$work/src/data.bin" -o "$work/t-tracker.torrent" --tracker "$tracker" >/dev/null

start_swarm() { # KIND N RATE DELAY_MS: seeders behind proxies, proxies announced
    local kind=$1 n=$2 rate=$3 delay=$4 i addr
    "$SWARMFS" tracker --listen 127.0.0.1:$tracker_port >"$work/tracker.out" 2>&1 &
    pids+=($!)
    for i in $(seq "$n"); do
        if [ "$kind" = swarmfs ]; then
            "$SWARMFS" seed "$work/t.torrent" -d "$work/src" --listen 127.0.0.$((10 + i)):0 --no-dht \
                >"$work/seed$i.out" 2>&1 &
            pids+=($!)
            wait_for "$work/seed$i.out" '^seeding' 120
        else
            "$LT_PYTHON" "$repo/tests/fixtures/lt_client.py" seed "$work/t.torrent" "$work/src" \
                >"$work/seed$i.out" 2>&1 &
            pids+=($!)
            wait_for "$work/seed$i.out" '^seeding' 120
        fi
        addr=$(grep -o 'listening on [^ ]*' "$work/seed$i.out" | head -1 | cut -d' ' -f3)
        "$WAN_PROXY" --listen 127.0.0.$((20 + i)):7000 --upstream "$addr" --delay-ms $((delay / 2)) \
            --rate "$rate" --announce "$tracker" --info-hash "$hash" --stats "$work/proxy$i.stats" \
            >"$work/proxy$i.out" 2>&1 &
        pids+=($!)
    done
    sleep 1 # the proxies' first announces
}

proxy_bytes() { cat "$work"/proxy*.stats 2>/dev/null | awk '{s += $2} END {print s + 0}'; }

mount_fresh() { # CLIENT
    if [ "$1" = btfs ]; then
        rm -rf "$work/btfs-data"; mkdir -p "$work/btfs-data"
        btfs --data-directory="$work/btfs-data" "$work/t-tracker.torrent" "$mnt"
        for _ in $(seq 600); do [ -e "$mnt/data.bin" ] && return 0; sleep 0.05; done
        echo "bench-wan: btfs did not mount" >&2; return 1
    fi
    "$SWARMFS" mount "$work/t.torrent" "$mnt" --tracker "$tracker" --no-dht --listen 127.0.0.2:0 \
        --log-file "$work/mount.log"
}

series() { # KIND(seeders) CLIENT N RATE RTT
    local kind=$1 client=$2 n=$3 rate=$4 rtt=$5 before secs after first rnd
    start_swarm "$kind" "$n" "$rate" "$rtt"
    # Sequential. Bytes are counted from before the mount to just after the read (the proxies
    # rewrite their stats every 50 ms; the background fill that goes on after the read is not
    # charged to it).
    before=$(proxy_bytes)
    mount_fresh "$client"
    secs=$(probe time - - -- dd if="$mnt/data.bin" of=/dev/null bs=1M count="$SEQ_MIB" status=none)
    sleep 0.06
    after=$(proxy_bytes)
    unmount
    # Deep first read, then random reads with the fill running.
    mount_fresh "$client"
    first=$(probe pread "$mnt/data.bin" "$deep")
    rnd=$(probe random "$mnt/data.bin" "$RANDOM_READS")
    unmount
    stop_all
    awk -v k="$kind" -v c="$client" -v mib="$SEQ_MIB" -v s="$secs" -v n="$n" -v r="$rate_bytes" \
        -v b="$((after - before))" -v f="$first" -v rnd="$rnd" 'BEGIN {
        rate = mib * 1048576 / s / 1e6; cap = n * r / 1e6
        split(rnd, q, " ")
        printf "  %-10s <- %-10s seq %6.1f MB/s (%3.0f%% of %.1f)  fetched/read %.2f  first@deep %7s ms  random p50 %6s p99 %6s max %6s ms\n",
            c, k, rate, 100 * rate / cap, cap, b / (mib * 1048576), f, q[1], q[2], q[3] }'
}

for profile in $PROFILES; do
    n=${profile%%x*}; rest=${profile#*x}; rate=${rest%/*}; rtt=${rest#*/}
    rate_bytes=$("$LT_PYTHON" -c "import re,sys; m=re.fullmatch(r'(\d+)(K|M|G)?(i?B)?','$rate'); print(int(m[1]) * {None:1,'K':1024,'M':1<<20,'G':1<<30}[m[2]])")
    echo "bench-wan: profile $n seeders x $rate/s x ${rtt} ms RTT (${SIZE_MIB} MiB file, ${SEQ_MIB} MiB read, deep read at $((deep >> 20)) MiB)"
    for kind in $KINDS; do
        case $kind in
            swarmfs) series swarmfs swarmfs "$n" "$rate" "$rtt" ;;
            libtorrent) series libtorrent swarmfs "$n" "$rate" "$rtt" ;;
            btfs) series libtorrent btfs "$n" "$rate" "$rtt" ;;
        esac
    done
done
