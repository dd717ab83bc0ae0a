#!/usr/bin/python3
"""Merges the outputs of several runs of one benchmark into one: each line of the first run is
matched with the same line of every other run (same text once numbers are blanked out, same
occurrence), and each number that differs between runs is printed as `median (min-max)`.
Numbers that agree, and lines that do not appear in every run, are printed as the first run has
them. Numbers are decimal tokens not part of a word, an address or a version (127.0.0.1 and
v1.2.3 are left alone); units may follow them (12ms, 95%).

    bench_median.py RUN1.txt RUN2.txt RUN3.txt
"""

import re
import statistics
import sys

NUMBER = re.compile(r"(?<![\w.\-])-?\d+(?:\.\d+)?(?![\d.]\d)(?!\.\d)")


def skeleton(line):
    return NUMBER.sub("#", line)


def numbers(line):
    return [m.group(0) for m in NUMBER.finditer(line)]


def fmt(values, texts):
    decimals = max((len(t.split(".")[1]) if "." in t else 0) for t in texts)
    med = statistics.median(values)
    return f"{med:.{decimals}f} ({min(values):.{decimals}f}-{max(values):.{decimals}f})"


def merge(runs):
    others = []
    for run in runs[1:]:
        by_skeleton = {}
        for line in run:
            by_skeleton.setdefault(skeleton(line), []).append(line)
        others.append(by_skeleton)
    seen = {}
    out = []
    for line in runs[0]:
        sk = skeleton(line)
        k = seen.get(sk, 0)
        seen[sk] = k + 1
        matches = [o.get(sk, []) for o in others]
        if "#" not in sk or any(len(m) <= k for m in matches):
            out.append(line)
            continue
        columns = list(zip(numbers(line), *(numbers(m[k]) for m in matches)))
        pieces = iter(NUMBER.split(line))
        merged = next(pieces)
        for texts, rest in zip(columns, pieces):
            if len(set(texts)) == 1:
                merged += texts[0]
            else:
                merged += fmt([float(t) for t in texts], texts)
            merged += rest
        out.append(merged)
    return out


def main():
    runs = []
    for path in sys.argv[1:]:
        with open(path, errors="replace") as f:
            runs.append(f.read().splitlines())
    if not runs:
        sys.exit("usage: bench_median.py RUN1 [RUN2 ...]")
    print("\n".join(merge(runs)))


if __name__ == "__main__":
    main()
