#!/usr/bin/env bash
# Benchmark: 1 GiB single-file torrent from one loopback seeder to one downloader at a time, all in
# one run, with swarmfs, aria2c, python3-libtorrent (uTP off) and rqbit (when installed) as
# downloaders, and swarmfs, then python3-libtorrent, as the seeder. Everything is on 127.0.0.1.
# Prints figures; asserts nothing (exits non-zero only when the bench itself cannot run).
#
# For each transfer: MB/s (10^6 bytes/s) over the wall time of the download command (start to exit,
# or to libtorrent's "done" line), MB/s after the first byte, time to first byte (polling the
# output file's allocated blocks every 10 ms) and the downloader's peak RSS (getrusage of the
# child). Also each seeder's peak RSS (VmHWM).
#
#   scripts/bench-engine.sh                              # builds the release binary first
#   KEEP_LOGS=DIR keeps the clients' output and logs in DIR.
#   SWARMFS=path/to/swarmfs SIZE_MIB=256 scripts/bench-engine.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

SIZE_MIB=${SIZE_MIB:-1024}
TIMEOUT=${TIMEOUT:-300}   # seconds allowed for one download
LT_PYTHON=/usr/bin/python3 # python3-libtorrent is only importable from the system python
for tool in aria2c python3 cmp; do
    command -v "$tool" >/dev/null || { echo "bench-engine: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
"$LT_PYTHON" -c 'import libtorrent' 2>/dev/null ||
    { echo "bench-engine: python3-libtorrent is missing (apt-get install python3-libtorrent)" >&2; exit 1; }

work=$(mktemp -d /tmp/bench-engine.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ -n "${KEEP_LOGS:-}" ]; then
        mkdir -p "$KEEP_LOGS" && cp "$work"/*.log "$work"/*.out "$work"/*.err "$KEEP_LOGS"/ 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${SWARMFS:-}" ]; then
    echo "bench-engine: building (release)"
    cargo build --release --quiet --bin swarmfs
    SWARMFS=${CARGO_TARGET_DIR:-target}/release/swarmfs
fi
. scripts/netns.sh
in_loopback_netns "$0" "$@" || echo "bench-engine: not root: running without network isolation"
# A private copy: a shared target directory may be rebuilt by someone else during the run.
cp "$SWARMFS" "$work/swarmfs"
SWARMFS=$work/swarmfs

# Runs one download command and reports "SECONDS TTFB RSS_KIB RC" (TTFB "-" if not seen).
cat >"$work/measure.py" <<'EOF'
import os, re, signal, subprocess, sys, time

def main():
    args = sys.argv[1:]
    opts = {}
    while args[0] != "--":
        opts[args[0]] = args[1]
        args = args[2:]
    cmd = args[1:]
    watch, done_re = opts.get("--watch"), opts.get("--done")
    timeout = float(opts.get("--timeout", "300"))
    out_path = opts["--out"]
    with open(out_path, "wb") as out, open(opts["--err"], "wb") as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                 start_new_session=True)
    def stop(*_):
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except OSError:
            pass
        sys.exit(130)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    ttfb = done = None
    seen = 0
    rc, rss = -1, 0
    while True:
        now = time.perf_counter() - t0
        if watch and ttfb is None:
            try:
                if os.stat(watch).st_blocks > 0:
                    ttfb = now
            except OSError:
                pass
        if done_re and done is None:
            with open(out_path, "rb") as f:
                f.seek(seen)
                chunk = f.read()
            if re.search(done_re.encode(), chunk, re.M):
                done = now
            elif b"\n" in chunk:
                seen += chunk.rindex(b"\n") + 1
        pid, status, ru = os.wait4(child.pid, os.WNOHANG)
        if pid:
            child.returncode = rc = os.waitstatus_to_exitcode(status)
            rss = ru.ru_maxrss
            if done is None:
                done = now
            break
        # A client that said "done" gets 30 s to exit (libtorrent flushes and says goodbye).
        if now > timeout or (done is not None and now > done + 30):
            os.killpg(child.pid, signal.SIGKILL)
            _, status, ru = os.wait4(child.pid, 0)
            child.returncode = rc = 124 if done is None else 0
            rss = ru.ru_maxrss
            if done is None:
                done = now
            break
        time.sleep(0.01)
    print("%.3f %s %d %d" % (done, "-" if ttfb is None else "%.3f" % ttfb, rss, rc))

main()
EOF

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # FILE REGEX SECONDS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench-engine: timed out waiting for '$2' in $1:" >&2
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
vmhwm_kib() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

name=data.bin
size=$((SIZE_MIB * 1024 * 1024))
mkdir -p "$work/src"
echo "bench-engine: writing ${SIZE_MIB} MiB of random data to $work/src/$name"
head -c "$size" /dev/urandom >"$work/src/$name"

"$SWARMFS" tracker --listen 127.0.0.1:0 >"$work/tracker.out" 2>"$work/tracker.err" &
pids+=($!)
wait_for "$work/tracker.out" 'listening on' 10
announce=$(grep -o 'http://[^ ]*' "$work/tracker.out" | head -1)
"$SWARMFS" create "$work/src/$name" -o "$work/t.torrent" --tracker "$announce" >/dev/null

rqbit_cmd=()
if command -v rqbit >/dev/null; then
    # Flags differ between rqbit versions: take the ones this one has.
    rq_help=$(rqbit --help 2>&1 || true)
    rq_dl_help=$(rqbit download --help 2>&1 || true)
    rqbit_cmd=(rqbit)
    for f in $(grep -oE -- '--disable-(dht|dht-persistence|upnp[a-z-]*|lsd|local-service-discovery)\b' <<<"$rq_help" | sort -u); do
        rqbit_cmd+=("$f")
    done
    if grep -q -- '--http-api-listen-addr' <<<"$rq_help"; then
        rqbit_cmd+=(--http-api-listen-addr "127.0.0.1:$(free_port)")
    fi
    rqbit_cmd+=(download --exit-on-finish)
    grep -q -- '--overwrite' <<<"$rq_dl_help" && rqbit_cmd+=(--overwrite)
    rq_initial_peers=$(grep -q -- '--initial-peers' <<<"$rq_dl_help" && echo yes || true)
fi

rows=()
# One download from SEEDER_ADDR by CLIENT; appends a row to the table.
bench_download() { # SEEDER_LABEL SEEDER_ADDR CLIENT
    local label=$1 addr=$2 client=$3 dl=$work/dl port cmd=() done_re=
    rm -rf "$dl"
    mkdir -p "$dl"
    cat "$work/src/$name" >/dev/null # keep the source in the page cache
    case $client in
    swarmfs) cmd=("$SWARMFS" download "$work/t.torrent" -d "$dl" --listen 127.0.0.1:0 --no-dht --peer "$addr") ;;
    aria2c)
        port=$(free_port)
        cmd=(aria2c --enable-dht=false --enable-dht6=false --bt-enable-lpd=false
            --enable-peer-exchange=false --seed-time=0 --file-allocation=none --disable-ipv6=true
            --summary-interval=0 --console-log-level=warn --listen-port="$port" --dir="$dl"
            "$work/t.torrent")
        ;;
    libtorrent)
        cmd=("$LT_PYTHON" "$repo/tests/fixtures/lt_client.py" download "$work/t.torrent" "$dl" --peer "$addr")
        done_re='^done'
        ;;
    rqbit)
        if [ ${#rqbit_cmd[@]} = 0 ]; then
            echo "bench-engine: $label -> rqbit skipped: rqbit is not on PATH (install: cargo install rqbit)"
            rows+=("$label|rqbit|-|-|-|-|skipped (cargo install rqbit)")
            return
        fi
        cmd=("${rqbit_cmd[@]}" -o "$dl")
        [ -n "$rq_initial_peers" ] && cmd+=(--initial-peers "$addr")
        cmd+=("$work/t.torrent")
        ;;
    esac
    echo "bench-engine: $label -> $client"
    local result secs ttfb rss rc status
    result=$(python3 "$work/measure.py" --out "$work/client.out" --err "$work/client.err" \
        --watch "$dl/$name" --timeout "$TIMEOUT" ${done_re:+--done "$done_re"} -- "${cmd[@]}")
    read -r secs ttfb rss rc <<<"$result"
    if [ "$rc" = 124 ]; then
        status="timeout after ${TIMEOUT}s"
    elif [ "$rc" != 0 ]; then
        status="failed, exit $rc"
    elif cmp -s "$work/src/$name" "$dl/$name"; then
        status=ok
    else
        status="data differs"
    fi
    [ "$status" = ok ] || { echo "bench-engine: $label -> $client: $status; its output:"; tail -5 "$work/client.out" "$work/client.err"; }
    rows+=("$(awk -v s="$size" -v t="$secs" -v f="$ttfb" -v r="$rss" -v l="$label" -v c="$client" -v st="$status" 'BEGIN {
        flow = (f == "-") ? "-" : sprintf("%.0f", (t > f) ? s / 1e6 / (t - f) : 0)
        printf "%s|%s|%.0f|%s|%s|%.1f|%s", l, c, (t > 0) ? s / 1e6 / t : 0, flow,
            (f == "-") ? "-" : sprintf("%.0f", f * 1000), r / 1024, st }')")
    rm -rf "$dl"
}

# Phase 1: swarmfs seeds.
"$SWARMFS" seed "$work/t.torrent" -d "$work/src" --listen 127.0.0.1:0 --no-dht >"$work/seed.out" 2>"$work/seed.err" &
seeder=$!
pids+=($seeder)
wait_for "$work/seed.out" '^seeding' 120
addr=$(grep -o 'listening on [^ ]*' "$work/seed.out" | head -1 | cut -d' ' -f3)
echo "bench-engine: swarmfs seeding on $addr"
for client in swarmfs aria2c libtorrent rqbit; do bench_download "swarmfs" "$addr" "$client"; done
seeder_rss_swarmfs=$(vmhwm_kib "$seeder")
stop_pid "$seeder"

# Phase 2: python3-libtorrent seeds the same data.
"$LT_PYTHON" "$repo/tests/fixtures/lt_client.py" seed "$work/t.torrent" "$work/src" >"$work/lt-seed.out" 2>"$work/lt-seed.err" &
seeder=$!
pids+=($seeder)
wait_for "$work/lt-seed.out" '^seeding' 120
addr=$(grep -o 'listening on [^ ]*' "$work/lt-seed.out" | head -1 | cut -d' ' -f3)
echo "bench-engine: libtorrent seeding on $addr"
for client in swarmfs aria2c libtorrent rqbit; do bench_download "libtorrent" "$addr" "$client"; done
seeder_rss_lt=$(vmhwm_kib "$seeder")
stop_pid "$seeder"

echo
echo "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); ${SIZE_MIB} MiB single file, 256 KiB pieces, loopback, source in the page cache"
echo "MB/s = 10^6 bytes/s over the download command's wall time; 'flowing' = after the first byte"
printf '  %-11s %-11s %8s %8s %9s %10s  %s\n' seeder downloader MB/s flowing "TTFB ms" "RSS MiB" status
for row in "${rows[@]}"; do
    IFS='|' read -r s c m f t r st <<<"$row"
    printf '  %-11s %-11s %8s %8s %9s %10s  %s\n' "$s" "$c" "$m" "$f" "$t" "$r" "$st"
done
printf '  seeder peak RSS (VmHWM): swarmfs %.1f MiB, libtorrent %.1f MiB\n' \
    "$(awk -v k="$seeder_rss_swarmfs" 'BEGIN { print k / 1024 }')" "$(awk -v k="$seeder_rss_lt" 'BEGIN { print k / 1024 }')"
