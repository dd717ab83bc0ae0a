# Sourced by scripts that start swarms: `in_loopback_netns "$0" "$@"` re-runs the calling script
# inside a fresh private network namespace that has only loopback, when we are root and not in
# one already, so nothing it starts (our DHT, libtorrent, btfs) can reach another host. It
# returns (status 1) only when it cannot isolate (not root, no `ip`): the caller goes on as is.
in_loopback_netns() {
    [ -n "${SWARMFS_NETNS:-}" ] && return 0 # already inside one
    { [ "$(id -u)" = 0 ] && command -v ip >/dev/null; } || return 1
    local ns="swarmfs-$$-$RANDOM" rc
    ip netns add "$ns" || return 1
    ip netns exec "$ns" ip link set lo up
    set +e
    SWARMFS_NETNS=$ns ip netns exec "$ns" bash "$@"
    rc=$?
    set -e
    ip netns del "$ns" 2>/dev/null || true
    exit $rc
}
