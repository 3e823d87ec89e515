#!/usr/bin/env python3
"""Markdown table of serving_bench.sh's load.txt: one row per (shape, concurrency), a column per
batching setting, each cell "requests/s (p50 / p99 ms)". With repeated runs (LOAD_REPEATS) a cell
gives the median run by throughput (the lower middle one of an even count) and the range of
throughputs.

  load_table.py OUT/load.txt [more load.txt files, whose columns are added in order]
"""
import os
import re
import statistics
import sys

HEADER = re.compile(r'--- load batching=(\w+) N=(\d+) Hq=(\d+) Hkv=(\d+) c=(\d+)')


def parse(path):
    runs = {}  # (shape, c) -> batching -> [(rps, p50, p99)]
    key = None
    rps = None
    for line in open(path):
        header = HEADER.match(line)
        if header:
            batching, n, hq, hkv, c = header.groups()
            tokens = f'{int(n) // 1024}k' if int(n) % 1024 == 0 else n
            key = (f'{tokens}, {hq} / {hkv} heads', int(c), batching)
            rps = None
        elif line.startswith('throughput:') and key:
            rps = float(line.split()[1])
        elif line.startswith('latency:') and key and rps is not None:
            fields = line.split()
            p50, p99 = float(fields[2]), float(fields[8])
            runs.setdefault(key[:2], {}).setdefault(key[2], []).append((rps, p50, p99))
    return runs


def cell(samples):
    if not samples:
        return 'not run'
    ordered = sorted(samples)
    rps, p50, p99 = ordered[(len(ordered) - 1) // 2]
    text = f'{rps:.1f} ({p50:.0f} / {p99:.0f})'
    if len(ordered) > 1:
        text += f' [{ordered[0][0]:.1f}-{ordered[-1][0]:.1f}]'
    return text


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    tables = [parse(path) for path in sys.argv[1:]]
    columns = [(i, b) for i, t in enumerate(tables) for b in ('on', 'off')
               if any(b in v for v in t.values())]
    rows = sorted({k for t in tables for k in t}, key=lambda k: (k[0], k[1]))
    # A column is named by the folder of its load.txt (serving_bench.sh's OUT).
    names = [f'{os.path.basename(os.path.dirname(os.path.abspath(sys.argv[1 + i])))}: batching {b}'
             for i, b in columns]
    print('| shape, c | ' + ' | '.join(names) + ' |')
    print('|---' * (len(names) + 1) + '|')
    for shape, c in rows:
        cells = [cell(tables[i].get((shape, c), {}).get(b, [])) for i, b in columns]
        print(f'| {shape}, c {c} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
