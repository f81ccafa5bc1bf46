"""Quick read-path measurements on a mounted vmcore (used while profiling).

usage: micro.py MOUNTPOINT [BACKING_FILE]
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import time


def lat(fd: int, size: int, n: int, span: int, base: int) -> list[float]:
    rng = random.Random(1)
    out = []
    for _ in range(n):
        off = base + rng.randrange(span // 4096) * 4096
        t = time.perf_counter_ns()
        os.pread(fd, size, off)
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


def seq(fd: int, bs: int, total: int, base: int) -> float:
    buf = bytearray(bs)
    t = time.perf_counter()
    done = 0
    while done < total:
        n = os.preadv(fd, [buf], base + done)
        if n <= 0:
            break
        done += n
    return done / (time.perf_counter() - t) / 1e9


def main() -> None:
    mnt = sys.argv[1]
    fd = os.open(f"{mnt}/vmcore", os.O_RDONLY)
    size = os.fstat(fd).st_size
    span = min(size - (1 << 20), 128 << 20)
    for s in (8, 4096):
        l = sorted(lat(fd, s, 5000, span, 1 << 20))
        print(f"vmcore random {s:>5} B: p50 {l[len(l)//2]:6.1f} us  p99 {l[int(len(l)*.99)]:6.1f} us")
    for bs in (128 << 10, 1 << 20):
        print(f"vmcore seq {bs >> 10:>5} KiB: {statistics.median(seq(fd, bs, 256 << 20, 0) for _ in range(3)):.2f} GB/s")
    if len(sys.argv) > 2:
        bfd = os.open(sys.argv[2], os.O_RDONLY)
        for bs in (128 << 10, 1 << 20):
            print(f"backing seq {bs >> 10:>5} KiB: {statistics.median(seq(bfd, bs, 256 << 20, 0) for _ in range(3)):.2f} GB/s")
        l = sorted(lat(bfd, 4096, 5000, span, 0))
        print(f"backing random 4096 B: p50 {l[len(l)//2]:6.1f} us")


if __name__ == "__main__":
    main()
