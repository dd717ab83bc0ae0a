#!/usr/bin/env bash
# The main job on a local swarm: build, make a sample data set, start the built-in tracker and a
# seeder on 127.0.0.1, mount the torrent, read every file through the mount and check it against
# the original, read a slice from the middle of the largest file, show progress, unmount.
# Needs no network once its packages and crates are installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v fusermount3 >/dev/null || ! command -v getfattr >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "demo: installing fuse3 and attr"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 attr >/dev/null
  else
    echo "demo: please install fuse3 and attr (sudo apt-get install fuse3 attr)" >&2; exit 1
  fi
fi
echo "demo: building (release)"
cargo build --release --quiet --offline 2>/dev/null || cargo build --release --quiet
SWARMFS="$PWD/target/release/swarmfs"

work=$(mktemp -d /tmp/swarmfs-demo.XXXXXX)
pids=()
cleanup() {
  fusermount3 -u "$work/mnt" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "demo: making a sample data set in $work/seed/dataset"
mkdir -p "$work/seed/dataset/images" "$work/seed/dataset/notes" "$work/mnt"
head -c 48M /dev/urandom > "$work/seed/dataset/video.bin"
head -c 3M /dev/urandom > "$work/seed/dataset/images/photo 1.raw"
head -c 777777 /dev/urandom > "$work/seed/dataset/images/photo-2.raw"
echo "hello from the swarm" > "$work/seed/dataset/notes/readme.txt"
: > "$work/seed/dataset/notes/empty"

"$SWARMFS" tracker --listen 127.0.0.1:0 > "$work/tracker.out" 2>"$work/tracker.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "listening on" "$work/tracker.out" 2>/dev/null && break; sleep 0.1; done
announce=$(grep -o 'http://[^ ]*' "$work/tracker.out" | head -1)
echo "demo: tracker at $announce"

"$SWARMFS" create "$work/seed/dataset" -o "$work/dataset.torrent" --tracker "$announce" >/dev/null
"$SWARMFS" seed "$work/dataset.torrent" -d "$work/seed" --listen 127.0.0.1:0 --no-dht > "$work/seed.out" 2>"$work/seed.log" &
pids+=($!)
for _ in $(seq 300); do grep -q "^seeding" "$work/seed.out" 2>/dev/null && break; sleep 0.1; done
echo "demo: $(grep '^seeding' "$work/seed.out")"

echo "demo: swarmfs mount dataset.torrent $work/mnt"
"$SWARMFS" mount "$work/dataset.torrent" "$work/mnt" --listen 127.0.0.1:0 --no-dht --log-file "$work/mount.log"
echo "demo: the tree:"
(cd "$work/mnt" && find dataset | sort | sed 's/^/    /')

echo "demo: sha256 through the mount vs the original:"
fail=0
while IFS= read -r -d '' f; do
  rel=${f#"$work/seed/"}
  a=$(sha256sum < "$f" | cut -d' ' -f1)
  b=$(sha256sum < "$work/mnt/$rel" | cut -d' ' -f1)
  if [ "$a" = "$b" ]; then echo "    ok   $rel"; else echo "    BAD  $rel"; fail=1; fi
done < <(find "$work/seed/dataset" -type f -print0)

echo "demo: 64 KiB from the middle of video.bin (offset 20 MiB):"
a=$(dd if="$work/seed/dataset/video.bin" bs=64K skip=320 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
b=$(dd if="$work/mnt/dataset/video.bin" bs=64K skip=320 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$a" = "$b" ] && echo "    ok   $b" || { echo "    BAD"; fail=1; }

echo "demo: getfattr -n user.swarmfs.progress:"
getfattr -n user.swarmfs.progress "$work/mnt/dataset/video.bin" 2>/dev/null | sed -n 's/^/    /;2p'
getfattr -n user.swarmfs.pieces "$work/mnt/dataset/video.bin" 2>/dev/null | sed -n 's/^/    /;2p'

echo "demo: cat .swarmfs/status (the mount's torrents; more can be copied into .swarmfs/add/):"
sed 's/^/    /' "$work/mnt/.swarmfs/status"

echo "demo: fusermount3 -u $work/mnt"
fusermount3 -u "$work/mnt"
[ $fail = 0 ] && echo "demo: all files read correctly through the mount" || { echo "demo: FAILED"; exit 1; }
