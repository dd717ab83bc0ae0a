"""Timing probes for the mount benchmarks (bench-mount.sh, bench-wan.sh); prints milliseconds.

  read_probe.py time OUT ERR -- CMD...      seconds CMD took (fails if it fails)
  read_probe.py first FILE OFFSET -- CMD... ms to the first 4 KiB at OFFSET with and without CMD
  read_probe.py pread FILE OFFSET           ms for one 4 KiB read
  read_probe.py random FILE N               p50 p99 max mean ms of N random 4 KiB preads
"""
import os, random, subprocess, sys, time

def ms(seconds):
    return "%.1f" % (seconds * 1000)

def main():
    what = sys.argv[1]
    if what == "time":  # time OUT ERR -- CMD...: seconds the command took (fails if it fails)
        split = sys.argv.index("--")
        files = [None if f == "-" else open(f, "wb") for f in sys.argv[2:split]]
        t0 = time.perf_counter()
        subprocess.run(sys.argv[split + 1:], check=True, stdin=subprocess.DEVNULL,
                       stdout=files[0], stderr=files[1])
        print("%.3f" % (time.perf_counter() - t0))
    elif what == "first":  # first FILE OFFSET -- MOUNT_CMD...: ms with the mount, ms without
        path, offset = sys.argv[2], int(sys.argv[3])
        t0 = time.perf_counter()
        subprocess.run(sys.argv[5:], check=True, stdin=subprocess.DEVNULL)
        t1 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        data = os.pread(fd, 4096, offset)
        t2 = time.perf_counter()
        os.close(fd)
        assert len(data) == 4096, "short read"
        print(ms(t2 - t0), ms(t2 - t1))
    elif what == "pread":  # pread FILE OFFSET: ms for one 4 KiB read
        path, offset = sys.argv[2], int(sys.argv[3])
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        data = os.pread(fd, 4096, offset)
        t1 = time.perf_counter()
        os.close(fd)
        assert len(data) == 4096, "short read"
        print(ms(t1 - t0))
    elif what == "random":  # random FILE N: p50 p99 max mean ms of N 4 KiB preads
        path, n = sys.argv[2], int(sys.argv[3])
        rng = random.Random(4096)
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        lat = []
        for _ in range(n):
            offset = rng.randrange(0, size - 4096)
            t0 = time.perf_counter()
            data = os.pread(fd, 4096, offset)
            lat.append(time.perf_counter() - t0)
            assert len(data) == 4096, "short read"
        os.close(fd)
        if os.environ.get("READ_PROBE_ALL"):  # every latency, in read order, on stderr
            print(" ".join(ms(x) for x in lat), file=sys.stderr)
        lat.sort()
        rank = lambda p: lat[max(0, -(-len(lat) * p // 100) - 1)]  # nearest rank
        print(ms(rank(50)), ms(rank(99)), ms(lat[-1]), ms(sum(lat) / len(lat)))

main()
