#!/usr/bin/env bash
# Installs what the tests need (fuse3 and the third-party clients the interop tests run), builds,
# then runs the whole suite. As root the suite runs inside a private network namespace that has
# only loopback, so nothing a test starts can reach another host.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
declare -A pkg_for=(
  [fusermount3]=fuse3 [getfattr]=attr [mktorrent]=mktorrent
  [transmission-show]=transmission-cli [transmission-create]=transmission-cli
  [aria2c]=aria2 [opentracker]=opentracker [ip]=iproute2
  [ffmpeg]=ffmpeg [ffprobe]=ffmpeg [zip]=zip [unzip]=unzip [sqlite3]=sqlite3
)
missing=()
for cmd in "${!pkg_for[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${pkg_for[$cmd]}")
done
/usr/bin/python3 -c 'import libtorrent' 2>/dev/null || missing+=(python3-libtorrent)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "test.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
  else
    echo "test.sh: missing packages: ${missing[*]} (run as root, or install them)" >&2
    exit 1
  fi
fi

echo "test.sh: checking format and lints"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings

echo "test.sh: building"
cargo build --quiet --all-targets
cargo test --no-run --quiet 2>/dev/null || cargo test --no-run

# No test may read or write the DHT routing table of real use (~/.local/state/swarmfs).
XDG_STATE_HOME=$(mktemp -d)
export XDG_STATE_HOME
# Every test has its own watchdogs; this bound turns anything they miss into a failure that
# prints what ran, instead of a silent CI time-out (the suite takes ~10 minutes here).
SUITE_BOUND=${SUITE_BOUND:-45m}
# A soft limit of 256 open files, as on small systems: every mount, seeder and test must live
# within it (tests that open hundreds of sockets themselves raise their own).
run_suite() { ulimit -Sn 256; timeout --kill-after=60 "$SUITE_BOUND" cargo test --offline -- --test-threads=2 "$@"; }

if [ "$(id -u)" = 0 ] && command -v ip >/dev/null; then
  # A private network namespace with only loopback (the same few lines as shared/tools/netns-run).
  ns="swarmfs-test-$$"
  ip netns add "$ns"
  trap 'ip netns del "$ns" 2>/dev/null || true; rm -rf "$XDG_STATE_HOME"' EXIT
  ip netns exec "$ns" ip link set lo up
  echo "test.sh: running the suite in network namespace $ns (loopback only)"
  ip netns exec "$ns" env SUITE_BOUND="$SUITE_BOUND" bash -c "$(declare -f run_suite); run_suite $*"
else
  echo "test.sh: not root: running the suite without network isolation"
  trap 'rm -rf "$XDG_STATE_HOME"' EXIT
  run_suite "$@"
fi
