#!/usr/bin/python3
"""The distribution-time experiment behind scripts/bench-distribution.sh.

One seeder (upload cap u_s), N leechers (upload cap u_i each, download unlimited), the built-in
tracker, every process on its own 127.0.0.x, --no-dht. Before the seeder starts, the swarm holds
no data, so nothing can move: the leechers start, announce and connect to each other, and the
seeder's start is the common start signal (t = 0, its own verify of F included). The run ends
when the last leecher holds a verified copy ("downloaded" line of `swarmfs download`); the
leechers keep seeding until then (--seed). The client-server baseline runs the same swarm with
--no-upload leechers (they never unchoke anyone).

Lower bounds (DESIGN.md, "The ideas"), with d_min unlimited:
    D_cs  >= max(N*F/u_s, F/d_min)
    D_p2p >= max(F/u_s, F/d_min, N*F/(u_s + sum u_i))

Prints the tables; the last line is machine-readable:
    p2p_ratio_max=<x> cs_ratio_max=<y>
Usage: distribution.py SWARMFS WORKDIR OUTDIR (settings from the environment, see main()).
"""

import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

MIB = 1 << 20


def bdecode(data, i=0):
    """A minimal bencode reader (the tracker's scrape reply)."""
    c = data[i:i + 1]
    if c == b"i":
        end = data.index(b"e", i)
        return int(data[i + 1:end]), end + 1
    if c in (b"l", b"d"):
        i += 1
        items = []
        while data[i:i + 1] != b"e":
            v, i = bdecode(data, i)
            items.append(v)
        if c == b"l":
            return items, i + 1
        return dict(zip(items[::2], items[1::2])), i + 1
    colon = data.index(b":", i)
    n = int(data[i:colon])
    return data[colon + 1:colon + 1 + n], colon + 1 + n


def free_port(ip):
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


class Proc:
    """A child whose stdout lines are timestamped as they arrive."""

    def __init__(self, name, args, log_dir):
        self.name = name
        self.lines = []  # (monotonic time, line)
        self.cond = threading.Condition()
        self.err = open(os.path.join(log_dir, name + ".log"), "w")
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.err,
                                  stdin=subprocess.DEVNULL, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            with self.cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.cond.notify_all()
        with self.cond:
            self.lines.append((time.monotonic(), None))
            self.cond.notify_all()

    def wait_line(self, prefix, deadline):
        """(time, line) of the first stdout line starting with prefix; None on exit or past the
        deadline (monotonic)."""
        with self.cond:
            while True:
                for t, line in self.lines:
                    if line is None:
                        return None
                    if line.startswith(prefix):
                        return t, line
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)

    def finish(self, within=15):
        try:
            self.p.wait(within)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.err.close()


def scrape_incomplete(tracker, info_hash):
    q = urllib.parse.quote_from_bytes(info_hash)
    with urllib.request.urlopen(f"http://{tracker}/scrape?info_hash={q}", timeout=5) as r:
        files, _ = bdecode(r.read())
    entry = files.get(b"files", {}).get(info_hash, {})
    return entry.get(b"incomplete", 0)


def run_swarm(cfg, n, up_caps, no_upload, tag):
    """One run: returns a dict of figures, or raises RuntimeError."""
    work = os.path.join(cfg["work"], tag)
    os.makedirs(work, exist_ok=True)
    swarmfs = cfg["swarmfs"]
    tracker_addr = f"127.0.0.1:{free_port('127.0.0.1')}"
    announce = f"http://{tracker_addr}/announce"
    procs = []
    try:
        tracker = Proc("tracker", [swarmfs, "tracker", "--listen", tracker_addr,
                                   "--interval", "5"], work)
        procs.append(tracker)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(tracker_addr.split(":"), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the tracker did not start")
                time.sleep(0.05)
        leechers = []
        for i in range(n):
            d = os.path.join(work, f"leecher{i}")
            os.makedirs(d, exist_ok=True)
            args = [swarmfs, "download", cfg["torrent"], "-d", d, "--seed",
                    "--listen", f"127.0.0.{10 + i}:0", "--no-dht", "--tracker", announce,
                    "--upload-rate", str(up_caps[i])]
            if no_upload:
                args.append("--no-upload")
            args += cfg["peer_args"]
            p = Proc(f"leecher{i}", args, work)
            procs.append(p)
            leechers.append(p)
        deadline = time.monotonic() + 60
        for p in leechers:
            if p.wait_line("listening on ", deadline) is None:
                raise RuntimeError(f"{p.name} did not start")
        # Every leecher announced (so each later one was told of the earlier ones and
        # connected to them); then a moment for the last connections to finish.
        while scrape_incomplete(tracker_addr, cfg["info_hash"]) < n:
            if time.monotonic() > deadline:
                raise RuntimeError("the leechers did not all announce")
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        seeder = Proc("seeder", [swarmfs, "seed", cfg["torrent"], "-d", cfg["content_dir"],
                                 "--listen", "127.0.0.2:0", "--no-dht", "--tracker", announce,
                                 "--upload-rate", str(cfg["u_s"])] + cfg["peer_args"], work)
        procs.append(seeder)
        bound = cfg["timeout_factor"] * max(8.0, n * cfg["F"] / cfg["u_s"])
        deadline = t0 + bound
        done = []
        for p in leechers:
            got = p.wait_line("downloaded ", deadline)
            if got is None:
                raise RuntimeError(f"{p.name} did not finish within {bound:.0f} s")
            done.append(got[0] - t0)
        for p in procs:
            p.stop()
        uploaded = {}
        for p in [seeder] + leechers:
            got = p.wait_line("uploaded ", time.monotonic() + 15)
            if got is None:
                raise RuntimeError(f"{p.name} did not report its upload")
            uploaded[p.name] = int(got[1].split()[1])
        # What each leecher got straight from the seeder ("received N bytes from peer ID at
        # 127.0.0.2:PORT" lines, printed when its download completed).
        from_seed = []
        for p in leechers:
            with p.cond:
                lines = [l for _, l in p.lines if l and l.startswith("received ")]
            from_seed.append(sum(int(l.split()[1]) for l in lines
                                 if l.split()[-1].startswith("127.0.0.2:")))
        return {"time": max(done), "first": min(done), "uploaded": uploaded,
                "from_seed": from_seed}
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            p.finish()
        subprocess.run(["rm", "-rf", work])


def bounds(cfg, n, up_caps):
    F, u_s = cfg["F"], cfg["u_s"]
    p2p = max(F / u_s, n * F / (u_s + sum(up_caps)))
    cs = n * F / u_s
    return p2p, cs


def median_run(cfg, n, up_caps, no_upload, tag):
    runs = []
    for r in range(cfg["runs"]):
        runs.append(run_swarm(cfg, n, up_caps, no_upload, f"{tag}-n{n}-r{r}"))
        sys.stderr.write(f"  {tag} N={n} run {r + 1}: {runs[-1]['time']:.2f} s "
                         f"(the first leecher done at {runs[-1]['first']:.2f} s)\n")
    runs.sort(key=lambda x: x["time"])
    med = runs[len(runs) // 2]
    med["min"], med["max"] = runs[0]["time"], runs[-1]["time"]
    return med


def fmt_spread(r):
    return f"{r['time']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def p2p_table(cfg, title, caps_of, cs_ns):
    """Runs the P2P swarm (and the CS baseline for N in cs_ns) for every N; prints the table."""
    F, u_s = cfg["F"], cfg["u_s"]
    print(f"\n{title}")
    print(f"F = {F / MIB:g} MiB in {cfg['piece_length'] // 1024} KiB pieces, u_s = "
          f"{u_s / MIB:g} MiB/s, d_i unlimited; times in s: median (min-max) of {cfg['runs']} runs")
    head = (f"{'N':>3} {'caps u_i MiB/s':>15} {'P2P':>18} {'bound':>6} {'ratio':>6} "
            f"{'CS':>18} {'bound':>6} {'ratio':>6}  {'seed up/F':>9} {'leecher up/F min/med/max':>25}"
            f" {'seed busy':>9} {'leecher busy med':>16} {'from seed/F med':>15}")
    print(head)
    rows = []
    for n in cfg["ns"]:
        caps = caps_of(n)
        p2p_b, cs_b = bounds(cfg, n, caps)
        p2p = median_run(cfg, n, caps, False, title.split()[0].lower())
        cs = median_run(cfg, n, caps, True, "cs") if n in cs_ns else None
        ups = sorted(p2p["uploaded"][f"leecher{i}"] / F for i in range(n))
        busy = sorted(p2p["uploaded"][f"leecher{i}"] / (caps[i] * p2p["time"]) for i in range(n))
        seed_up = p2p["uploaded"]["seeder"] / F
        seed_busy = p2p["uploaded"]["seeder"] / (u_s * p2p["time"])
        cap_text = (f"{caps[0] / MIB:g}" if len(set(caps)) == 1
                    else "/".join(f"{c / MIB:g}" for c in sorted(set(caps), reverse=True)))
        cs_text = (f"{fmt_spread(cs):>18} {cs_b:6.2f} {cs['time'] / cs_b:6.3f}" if cs
                   else f"{'-':>18} {cs_b:6.2f} {'-':>6}")
        print(f"{n:>3} {cap_text:>15} {fmt_spread(p2p):>18} {p2p_b:6.2f} "
              f"{p2p['time'] / p2p_b:6.3f} {cs_text}  {seed_up:9.2f} "
              f"{ups[0]:7.2f}/{statistics.median(ups):.2f}/{ups[-1]:.2f}{'':>9}"
              f" {seed_busy:9.2f} {statistics.median(busy):16.2f}"
              f" {statistics.median(p2p['from_seed']) / F:15.2f}", flush=True)
        rows.append({"n": n, "p2p": p2p["time"], "p2p_bound": p2p_b,
                     "cs": cs["time"] if cs else None, "cs_bound": cs_b})
    return rows


def plot(rows, out_dir, name, title):
    data = os.path.join(out_dir, name + ".dat")
    with open(data, "w") as f:
        for r in rows:
            cs = f"{r['cs']:.3f}" if r["cs"] is not None else "NaN"
            f.write(f"{r['n']} {r['p2p']:.3f} {r['p2p_bound']:.3f} {cs} {r['cs_bound']:.3f}\n")
    png = os.path.join(out_dir, name + ".png")
    script = f"""
set terminal pngcairo size 900,600 noenhanced
set output '{png}'
set title '{title}'
set xlabel 'leechers N'
set ylabel 'time until every leecher holds F (s)'
set logscale xy 2
set key top left
set grid
plot '{data}' using 1:2 with linespoints lw 2 title 'P2P measured', \\
     '' using 1:3 with lines dt 2 lw 2 title 'P2P bound', \\
     '' using 1:4 with linespoints lw 2 title 'client-server measured', \\
     '' using 1:5 with lines dt 2 lw 2 title 'client-server bound'
"""
    try:
        subprocess.run(["gnuplot"], input=script, text=True, check=True)
        print(f"plot: {png}")
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"plot: not drawn ({e})")


def main():
    swarmfs, work, out_dir = sys.argv[1:4]
    env = os.environ
    F = int(env.get("F_MIB", "32")) * MIB
    cfg = {
        "swarmfs": swarmfs,
        "work": work,
        "F": F,
        "piece_length": 256 * 1024,
        "u_s": int(float(env.get("US_MIB", "4")) * MIB),
        "u_i": int(float(env.get("UI_MIB", "4")) * MIB),
        "ns": [int(x) for x in env.get("NS", "1 2 4 8 16 32").split()],
        "cs_max": int(env.get("CS_MAX_N", "8")),
        "runs": int(env.get("RUNS", "3")),
        "timeout_factor": 10,
        # Extra options for every peer (experiments: PEER_ARGS="--upload-slots 2").
        "peer_args": env.get("PEER_ARGS", "").split(),
        "tables": env.get("TABLES", "homogeneous heterogeneous").split(),
    }
    content_dir = os.path.join(work, "content")
    os.makedirs(content_dir, exist_ok=True)
    with open(os.path.join(content_dir, "blob.bin"), "wb") as f:
        f.write(os.urandom(F))
    torrent = os.path.join(work, "blob.torrent")
    subprocess.run([swarmfs, "create", os.path.join(content_dir, "blob.bin"), "-o", torrent,
                    "--piece-length", "256KiB"], check=True, stdout=subprocess.DEVNULL)
    info = subprocess.run([swarmfs, "info", torrent], check=True, capture_output=True,
                          text=True).stdout
    ih = next(l.split()[-1] for l in info.splitlines() if "info-hash" in l.lower())
    cfg.update(torrent=torrent, content_dir=content_dir, info_hash=bytes.fromhex(ih))
    os.makedirs(out_dir, exist_ok=True)

    u = cfg["u_i"]
    cs_ns = [n for n in cfg["ns"] if n <= cfg["cs_max"]]
    homo = p2p_table(cfg, "Homogeneous: every leecher uploads u_i = u_s", lambda n: [u] * n,
                     cs_ns)
    plot(homo, out_dir, "distribution", "Distributing F = 32 MiB: swarmfs against the bounds")
    # Half the leechers (every other one) with a quarter of the upload.
    hetero = []
    if "heterogeneous" in cfg["tables"]:
        hetero = p2p_table(cfg, "Heterogeneous: half the leechers upload u_i / 4",
                           lambda n: [u if i % 2 == 0 else u // 4 for i in range(n)], [])
        plot(hetero, out_dir, "distribution-heterogeneous",
             "Half the leechers with a quarter of the upload")
    p2p_max = max(r["p2p"] / r["p2p_bound"] for r in homo)
    cs_ratios = [r["cs"] / r["cs_bound"] for r in homo if r["cs"] is not None]
    cs_max = max(cs_ratios) if cs_ratios else float("nan")
    if hetero:
        print(f"heterogeneous_p2p_ratio_max={max(r['p2p'] / r['p2p_bound'] for r in hetero):.3f}")
    print(f"p2p_ratio_max={p2p_max:.3f} cs_ratio_max={cs_max:.3f}")


if __name__ == "__main__":
    main()
