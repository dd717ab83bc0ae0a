#!/usr/bin/env bash
# Benchmark of `swarmfs mount` on 127.0.0.1: a 1 GiB single-file torrent, one seeder, a fresh
# mount for each measurement. Prints figures; asserts nothing (exits non-zero only when the bench
# itself cannot run).
#   - sequential `cat` through the mount vs `swarmfs download` from the same seeder, from a swarmfs
#     seeder and from a python3-libtorrent seeder;
#   - time to the first 4 KiB at offset 700 MiB, with and without the mount command itself, and
#     once more on a mount left to settle for a second;
#   - 64 random 4 KiB preads: p50 / p99 / max latency;
#   - with --cache-size 64M while reading the whole file: peak RSS (VmHWM) of the mount process and
#     the bytes it wrote to disk (/proc/PID/io write_bytes).
#
#   scripts/bench-mount.sh                              # builds the release binary first
#   KEEP_LOGS=DIR keeps the clients' output and logs in DIR.
#   SWARMFS=path/to/swarmfs SIZE_MIB=256 scripts/bench-mount.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

SIZE_MIB=${SIZE_MIB:-1024}
DEEP_MIB=${DEEP_MIB:-700}    # offset of the deep first read
RANDOM_READS=${RANDOM_READS:-64}
LT_PYTHON=/usr/bin/python3   # python3-libtorrent is only importable from the system python
for tool in fusermount3 pgrep python3 timeout; do
    command -v "$tool" >/dev/null || { echo "bench-mount: $tool is missing (apt-get install fuse3 procps)" >&2; exit 1; }
done
[ -e /dev/fuse ] || { echo "bench-mount: /dev/fuse is missing" >&2; exit 1; }
lt_ok=yes
"$LT_PYTHON" -c 'import libtorrent' 2>/dev/null || lt_ok=

work=$(mktemp -d /tmp/bench-mount.XXXXXX)
mnt=$work/mnt
pids=()      # processes we started (seeders)
mount_pid=   # the background mount process, when one is up
cleanup() {
    if mountpoint -q "$mnt" 2>/dev/null; then
        fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" 2>/dev/null || true
    fi
    [ -n "$mount_pid" ] && kill "$mount_pid" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    sleep 0.2
    mountpoint -q "$mnt" 2>/dev/null && fusermount3 -uz "$mnt" 2>/dev/null
    if [ -n "${KEEP_LOGS:-}" ]; then
        mkdir -p "$KEEP_LOGS" && cp "$work"/*.log "$work"/*.out "$work"/*.err "$KEEP_LOGS"/ 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${SWARMFS:-}" ]; then
    echo "bench-mount: building (release)"
    cargo build --release --quiet --bin swarmfs
    SWARMFS=${CARGO_TARGET_DIR:-target}/release/swarmfs
fi
. scripts/netns.sh
in_loopback_netns "$0" "$@" || echo "bench-mount: not root: running without network isolation"
# A private copy: a shared target directory may be rebuilt by someone else during the run.
cp "$SWARMFS" "$work/swarmfs"
SWARMFS=$work/swarmfs

probe() { python3 "$repo/scripts/read_probe.py" "$@"; }

wait_for() { # FILE REGEX SECONDS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench-mount: timed out waiting for '$2' in $1:" >&2
    cat "$1" "${1%.out}.err" >&2 2>/dev/null || true
    return 1
}
stop_pid() { # kill a process we started and forget it
    local p=$1 kept=() q
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    for q in "${pids[@]}"; do [ "$q" = "$p" ] || kept+=("$q"); done
    pids=("${kept[@]}")
}
mib_per_s() { awk -v s="$size" -v t="$1" 'BEGIN { printf "%.0f", (t > 0) ? s / 1e6 / t : 0 }'; }

name=data.bin
size=$((SIZE_MIB * 1024 * 1024))
deep=$((DEEP_MIB * 1024 * 1024))
[ "$deep" -lt $((size - 4096)) ] || deep=$((size / 3 * 2 / 4096 * 4096))
mkdir -p "$work/src" "$mnt"
echo "bench-mount: writing ${SIZE_MIB} MiB of random data to $work/src/$name"
head -c "$size" /dev/urandom >"$work/src/$name"
"$SWARMFS" create "$work/src/$name" -o "$work/t.torrent" >/dev/null

mounts=0
mount_cmd() { # [EXTRA ARGS...]: sets mcmd to the command line of a fresh mount on $mnt from $addr
    mounts=$((mounts + 1))
    mcmd=("$SWARMFS" mount "$work/t.torrent" "$mnt" --listen 127.0.0.1:0 --no-dht --peer "$addr"
        --log-file "$work/mount-$mounts.log" "$@")
}
find_mount_pid() {
    mount_pid=$(pgrep -f "^$SWARMFS mount $work/t.torrent $mnt " | head -1 || true)
    [ -n "$mount_pid" ] || { echo "bench-mount: no mount process found" >&2; exit 1; }
}
do_mount() { # [EXTRA ARGS...]
    mount_cmd "$@"
    "${mcmd[@]}"
    find_mount_pid
}
unmount() {
    local i
    for i in 1 2 3 4 5; do fusermount3 -u "$mnt" 2>/dev/null && break; sleep 0.2; done
    mountpoint -q "$mnt" && { echo "bench-mount: $mnt busy, detaching it"; fusermount3 -uz "$mnt"; }
    # The mount process should exit within 2 s of the unmount.
    for ((i = 0; i < 100; i++)); do [ -d "/proc/$mount_pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$mount_pid" ]; then
        echo "bench-mount: mount process $mount_pid still up 10 s after unmount; SIGTERM"
        kill "$mount_pid" 2>/dev/null || true
        sleep 1
    fi
    mount_pid=
}
seq_read() { # SEEDER_LABEL: cat through a fresh mount vs swarmfs download, same seeder
    local label=$1 t_mount t_cat t_dl
    cat "$work/src/$name" >/dev/null # keep the source in the page cache
    mount_cmd
    t_mount=$(probe time - - -- "${mcmd[@]}")
    find_mount_pid
    t_cat=$(probe time /dev/null - -- cat "$mnt/$name")
    unmount
    rm -rf "$work/dl"
    mkdir -p "$work/dl"
    cat "$work/src/$name" >/dev/null
    t_dl=$(probe time "$work/dl.out" "$work/dl.err" -- \
        "$SWARMFS" download "$work/t.torrent" -d "$work/dl" --listen 127.0.0.1:0 --no-dht --peer "$addr")
    cmp -s "$work/src/$name" "$work/dl/$name" || echo "bench-mount: swarmfs download from $label: data differs"
    rm -rf "$work/dl"
    seq_rows+=("$label|$(mib_per_s "$t_cat")|$(mib_per_s "$t_dl")|$(awk -v a="$t_cat" -v b="$t_dl" 'BEGIN { printf "%.0f%%", (a > 0) ? 100 * b / a : 0 }')|$(awk -v t="$t_mount" 'BEGIN { printf "%.0f", t * 1000 }')")
}
seq_rows=()

# swarmfs seeds.
"$SWARMFS" seed "$work/t.torrent" -d "$work/src" --listen 127.0.0.1:0 --no-dht >"$work/seed.out" 2>"$work/seed.err" &
seeder=$!
pids+=($seeder)
wait_for "$work/seed.out" '^seeding' 120
addr=$(grep -o 'listening on [^ ]*' "$work/seed.out" | head -1 | cut -d' ' -f3)
echo "bench-mount: swarmfs seeding on $addr"

echo "bench-mount: sequential cat vs swarmfs download (swarmfs seeder)"
seq_read swarmfs

echo "bench-mount: first 4 KiB at offset $((deep / 1048576)) MiB on a fresh mount"
mount_cmd
read -r first_with first_without <<<"$(probe first "$mnt/$name" "$deep" -- "${mcmd[@]}")"
find_mount_pid
unmount
do_mount
sleep 1
first_settled=$(probe pread "$mnt/$name" "$deep")
unmount

echo "bench-mount: $RANDOM_READS random 4 KiB reads on a fresh mount"
do_mount
read -r rand_p50 rand_p99 rand_max rand_mean <<<"$(probe random "$mnt/$name" "$RANDOM_READS")"
unmount

echo "bench-mount: whole file through a fresh mount with --cache-size 64M"
cat "$work/src/$name" >/dev/null
do_mount --cache-size 64M
io_before=$(awk '/^write_bytes/ { print $2 }' "/proc/$mount_pid/io")
t_cat64=$(probe time /dev/null - -- cat "$mnt/$name")
rss64=$(awk '/^VmHWM/ { print $2 }' "/proc/$mount_pid/status")
io_after=$(awk '/^write_bytes/ { print $2 }' "/proc/$mount_pid/io")
log64=$work/mount-$mounts.log
unmount
log64_bytes=$(stat -c %s "$log64" 2>/dev/null || echo 0)
stop_pid "$seeder"

# python3-libtorrent seeds the same data.
if [ -n "$lt_ok" ]; then
    "$LT_PYTHON" "$repo/tests/fixtures/lt_client.py" seed "$work/t.torrent" "$work/src" >"$work/lt-seed.out" 2>"$work/lt-seed.err" &
    seeder=$!
    pids+=($seeder)
    wait_for "$work/lt-seed.out" '^seeding' 120
    addr=$(grep -o 'listening on [^ ]*' "$work/lt-seed.out" | head -1 | cut -d' ' -f3)
    echo "bench-mount: libtorrent seeding on $addr"
    echo "bench-mount: sequential cat vs swarmfs download (libtorrent seeder)"
    seq_read libtorrent
    stop_pid "$seeder"
else
    echo "bench-mount: libtorrent seeder skipped: python3-libtorrent is missing (apt-get install python3-libtorrent)"
    seq_rows+=("libtorrent|-|-|-|-")
fi

echo
echo "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); ${SIZE_MIB} MiB single file, 256 KiB pieces, one seeder on 127.0.0.1, fresh mount each time"
echo "sequential read (MB/s = 10^6 bytes/s; cat excludes the mount command; default --cache-size):"
printf '  %-11s %10s %14s %12s %10s\n' seeder "cat MB/s" "download MB/s" "cat/download" "mount ms"
for row in "${seq_rows[@]}"; do
    IFS='|' read -r s c d r m <<<"$row"
    printf '  %-11s %10s %14s %12s %10s\n' "$s" "$c" "$d" "$r" "$m"
done
echo "latency (swarmfs seeder):"
printf '  %-52s %8s ms\n' "first 4 KiB at $((deep / 1048576)) MiB, mount command included" "$first_with"
printf '  %-52s %8s ms\n' "first 4 KiB at $((deep / 1048576)) MiB, after the mount returned" "$first_without"
printf '  %-52s %8s ms\n' "same, 1 s after the mount (background fetch running)" "$first_settled"
printf '  %-52s %8s ms\n' "$RANDOM_READS random 4 KiB reads: p50" "$rand_p50"
printf '  %-52s %8s ms\n' "$RANDOM_READS random 4 KiB reads: p99" "$rand_p99"
printf '  %-52s %8s ms\n' "$RANDOM_READS random 4 KiB reads: max / mean" "$rand_max / $rand_mean"
echo "--cache-size 64M, whole file read (swarmfs seeder):"
printf '  %-52s %8s MB/s\n' "cat" "$(mib_per_s "$t_cat64")"
printf '  %-52s %8.1f MiB\n' "peak RSS of the mount process (VmHWM)" "$(awk -v k="$rss64" 'BEGIN { print k / 1024 }')"
printf '  %-52s %8s bytes\n' "written to disk during the read (write_bytes delta)" "$((io_after - io_before))"
printf '  %-52s %8s bytes\n' "  (its log file, at unmount)" "$log64_bytes"
