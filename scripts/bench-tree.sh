#!/usr/bin/env bash
# Huge trees (issue 10, item 5): a torrent of FILES files (default 100,000) in DIRS directories
# (default 1,000; the first holds a tenth of all files: the biggest directory), mounted with no
# seeder, since listing needs no piece data. Prints, for swarmfs and btfs (Debian's; installed
# when root and missing), the median of RUNS runs (min-max) of:
#   - mount ready: from starting the mount to the tree being listable;
#   - `ls -f` of the biggest directory;
#   - `find MNT/tree | wc -l` (lookups and readdir of every directory; the torrent only, not
#     swarmfs's .swarmfs control directory);
#   - `find MNT/tree -type f -size +0 | wc -l` (a getattr of every file too).
# Asserts nothing. Inside a loopback-only network namespace when root (btfs runs libtorrent with
# its DHT on; there it reaches nothing).
#
#   scripts/bench-tree.sh
#   FILES=20000 DIRS=200 RUNS=3 KINDS=swarmfs scripts/bench-tree.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
FILES=${FILES:-100000}
DIRS=${DIRS:-1000}
RUNS=${RUNS:-3}
KINDS=${KINDS:-"swarmfs btfs"}

if [ -z "${SWARMFS:-}" ]; then
    echo "bench-tree: building (release)"
    cargo build --release --quiet --bin swarmfs
    export SWARMFS=$repo/${CARGO_TARGET_DIR:-target}/release/swarmfs
fi
if [[ $KINDS == *btfs* ]] && ! command -v btfs >/dev/null && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null; then
    echo "bench-tree: installing btfs"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq btfs; } \
        >/dev/null 2>&1 || true
fi
. scripts/netns.sh
if ! in_loopback_netns "$0" "$@" && [ -z "${SWARMFS_NETNS:-}" ]; then
    echo "bench-tree: not root: no network isolation; btfs skipped"
    KINDS=${KINDS//btfs/}
fi
command -v btfs >/dev/null || { [[ $KINDS == *btfs* ]] && echo "bench-tree: btfs is not installed: skipped"; KINDS=${KINDS//btfs/}; }

work=$(mktemp -d /dev/shm/bench-tree.XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt"
cleanup() {
    mountpoint -q "$mnt" 2>/dev/null && { fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt"; }
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "bench-tree: making $FILES files in $DIRS directories"
big=$((FILES / 10))
/usr/bin/python3 - "$work/src/tree" "$FILES" "$DIRS" "$big" <<'EOF'
import os, sys
root, files, dirs, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rest = (files - big) // (dirs - 1)
n = 0
for d in range(dirs):
    path = os.path.join(root, f"dir{d:04}")
    os.makedirs(path)
    count = big if d == 0 else (rest if d < dirs - 1 else files - big - rest * (dirs - 2))
    for i in range(count):
        with open(os.path.join(path, f"file{i:06}.dat"), "wb") as f:
            f.write(b"%d\n" % n)
        n += 1
EOF
start=$(date +%s.%N)
"$SWARMFS" create "$work/src/tree" -o "$work/tree.torrent" --piece-length 16KiB >/dev/null
echo "bench-tree: torrent made in $(echo "$(date +%s.%N) - $start" | bc | cut -c1-5) s ($(stat -c %s "$work/tree.torrent") bytes)"

now() { date +%s.%N; }
ms() { echo "($2 - $1) * 1000" | bc | cut -d. -f1; }
stats() { # VALUES... -> "median (min-max)"
    printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {printf "%6d ms (%d-%d)", v[int((NR+1)/2)], v[1], v[NR]}'
}

mount_it() { # KIND
    case $1 in
    swarmfs)
        "$SWARMFS" mount "$work/tree.torrent" "$mnt" --no-dht --listen 127.0.0.1:0 \
            --log-file "$work/mount.log" ;;
    btfs)
        rm -rf "$work/btfs-data"; mkdir -p "$work/btfs-data"
        btfs --data-directory="$work/btfs-data" "$work/tree.torrent" "$mnt"
        # btfs returns before its tree is there.
        for _ in $(seq 6000); do [ -d "$mnt/tree/dir0000" ] && break; sleep 0.01; done ;;
    esac
}

for kind in $KINDS; do
    ready=(); ls_big=(); find_all=(); find_stat=()
    for _ in $(seq "$RUNS"); do
        t0=$(now); mount_it "$kind"; t1=$(now)
        n=$(ls -f "$mnt/tree/dir0000" | wc -l); t2=$(now)
        total=$(find "$mnt/tree" | wc -l); t3=$(now)
        sized=$(find "$mnt/tree" -type f -size +0 | wc -l); t4=$(now)
        ready+=("$(ms "$t0" "$t1")"); ls_big+=("$(ms "$t1" "$t2")")
        find_all+=("$(ms "$t2" "$t3")"); find_stat+=("$(ms "$t3" "$t4")")
        [ "$n" = $((big + 2)) ] || echo "bench-tree: $kind listed $n entries in dir0000, expected $((big + 2))" >&2
        [ "$sized" = "$FILES" ] || echo "bench-tree: $kind found $sized files, expected $FILES" >&2
        fusermount3 -u "$mnt"
        sleep 0.5
    done
    printf '%-8s mount ready %s | ls -f %d entries %s | find: %d entries %s | find -size: %s\n' \
        "$kind" "$(stats "${ready[@]}")" "$big" "$(stats "${ls_big[@]}")" "$total" \
        "$(stats "${find_all[@]}")" "$(stats "${find_stat[@]}")"
done
