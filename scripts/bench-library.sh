#!/usr/bin/env bash
# One mount, many torrents (issue 10, item 4 figures): for N in COUNTS (default 1 10 100), N
# torrents of SIZE_MIB (default 4) each, every one seeded by its own `swarmfs seed` found through
# the built-in tracker, all mounted from one watched directory with --idle-timeout IDLE (default
# 5 s) and --cache-size 1MiB (so an idle torrent holds almost nothing and its next read must go
# to the swarm). Prints, per N: mount ready, then the mount's RSS and open fds while awake (every
# torrent connected) and once idle, and the wake-up of an idle torrent: the slowest of four 4 KiB
# reads at 1/8, 3/8, 5/8 and 7/8 of one of its files (the cache holds at most 4 of its pieces, so
# at least one read waits for reconnecting and then one piece over loopback). Asserts nothing.
# Loopback-only netns as root.
#
#   scripts/bench-library.sh
#   COUNTS="1 10" IDLE=3 scripts/bench-library.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
COUNTS=${COUNTS:-"1 10 100"}
SIZE_MIB=${SIZE_MIB:-4}
IDLE=${IDLE:-5}

if [ -z "${SWARMFS:-}" ]; then
    echo "bench-library: building (release)"
    cargo build --release --quiet --bin swarmfs
    export SWARMFS=$repo/${CARGO_TARGET_DIR:-target}/release/swarmfs
fi
. scripts/netns.sh
in_loopback_netns "$0" "$@" || echo "bench-library: not root: no network isolation"

work=$(mktemp -d /dev/shm/bench-library.XXXXXX)
mnt=$work/mnt
pids=()
cleanup() {
    mountpoint -q "$mnt" 2>/dev/null && { fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt"; }
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
ms() { /usr/bin/python3 -c "import sys; print(round((float(sys.argv[2]) - float(sys.argv[1])) * 1000))" "$1" "$2"; }
rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
# Sockets among the fds (TCP connections to peers, listeners, the control socket, FUSE is not one).
sockets() { find "/proc/$1/fd" -lname 'socket:*' 2>/dev/null | wc -l; }
# Sum of user.swarmfs.peers counts over the mount's torrents.
peers() {
    local total=0 v
    for top in "$mnt"/*; do
        v=$(getfattr --only-values -n user.swarmfs.peers "$top" 2>/dev/null || true)
        for kv in $v; do
            case $kv in dht_nodes=*) ;; *=*) total=$((total + ${kv#*=})) ;; esac
        done
    done
    echo "$total"
}

"$SWARMFS" tracker --listen 127.0.0.1:0 > "$work/tracker.out" 2> "$work/tracker.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "listening on" "$work/tracker.out" 2>/dev/null && break; sleep 0.05; done
tracker="http://$(grep -o '127.0.0.1:[0-9]*' "$work/tracker.out" | head -1)/announce"

printf '%-5s %10s %12s %10s %12s %10s %10s %12s\n' N "ready ms" "awake MiB" "awake fds" \
    "idle MiB" "idle fds" "idle socks" "wake read ms"
for n in $COUNTS; do
    rm -rf "$work/src" "$work/torrents" "$mnt"
    mkdir -p "$work/src" "$work/torrents" "$mnt"
    seeders=()
    for i in $(seq "$n"); do
        name="t$i.bin"
        head -c "$((SIZE_MIB << 20))" /dev/urandom > "$work/src/$name"
        "$SWARMFS" create "$work/src/$name" -o "$work/torrents/t$i.torrent" --tracker "$tracker" > /dev/null
        "$SWARMFS" seed "$work/torrents/t$i.torrent" -d "$work/src" --listen 127.0.0.1:0 --no-dht \
            > /dev/null 2> "$work/seed$i.log" &
        seeders+=($!)
    done
    pids+=("${seeders[@]}")
    started=$(now)
    "$SWARMFS" mount -f "$work/torrents" "$mnt" --listen 127.0.0.1:0 --no-dht \
        --idle-timeout "$IDLE" --cache-size 1MiB > "$work/mount.out" 2> "$work/mount.log" &
    mount_pid=$!
    pids+=("$mount_pid")
    for _ in $(seq 2000); do grep -q "^mounted" "$work/mount.out" 2>/dev/null && break; sleep 0.01; done
    ready=$(ms "$started" "$(now)")
    # Awake: every torrent connected to its seeder.
    for _ in $(seq 600); do [ "$(peers)" -ge "$n" ] && break; sleep 0.1; done
    awake_rss=$(rss_mib "$mount_pid"); awake_fds=$(fds "$mount_pid")
    # Idle: nobody reads; every connection closes.
    sleep "$IDLE"
    for _ in $(seq 600); do [ "$(peers)" -eq 0 ] && break; sleep 0.1; done
    sleep 1
    idle_rss=$(rss_mib "$mount_pid"); idle_fds=$(fds "$mount_pid"); idle_socks=$(sockets "$mount_pid")
    wake=$(/usr/bin/python3 - "$mnt/t1.bin" "$((SIZE_MIB << 20))" <<'EOF'
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
size, worst = int(sys.argv[2]), 0.0
for eighth in (1, 3, 5, 7):
    t = time.monotonic()
    os.pread(fd, 4096, size * eighth // 8)
    worst = max(worst, time.monotonic() - t)
print(round(worst * 1000, 1))
EOF
)
    printf '%-5s %10s %12s %10s %12s %10s %10s %12s\n' "$n" "$ready" "$awake_rss" "$awake_fds" \
        "$idle_rss" "$idle_fds" "$idle_socks" "$wake"
    fusermount3 -u "$mnt"
    wait "$mount_pid" 2>/dev/null || true
    kill "${seeders[@]}" 2>/dev/null || true
    wait "${seeders[@]}" 2>/dev/null || true
done
