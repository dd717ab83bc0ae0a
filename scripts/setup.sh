#!/usr/bin/env bash
# Installs the system packages swarmfs needs to run (fuse3 for fusermount3) and builds the release
# binary at target/release/swarmfs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v fusermount3 >/dev/null || need_pkgs+=(fuse3)
command -v getfattr >/dev/null || need_pkgs+=(attr)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "setup.sh: please install: ${need_pkgs[*]} (e.g. sudo apt-get install ${need_pkgs[*]})" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null || { echo "setup.sh: Rust is missing: install it from rustup.rs" >&2; exit 1; }
cargo build --release --quiet
echo "built target/release/swarmfs"
