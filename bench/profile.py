"""Where the Python read path's time goes: py-spy on the vmcorefs daemon.

This is the profile that motivated the native read path (vmcorefs._readpath):
it mounts with ``--reads python --direct`` so that every read is a FUSE
request answered by Python.  (The native path's own profile is a kernel one:
``perf record -a`` around a dd, see docs/benchmarks.md.)

Boots one memfd guest (default 4 GiB), mounts it, and for each workload --
random 4 KiB preads over guest RAM, sequential 1 MiB preads -- records the
daemon with ``py-spy record --native --idle`` while counting the daemon's
system calls (/proc/PID/io syscr) per request.  Prints the heaviest frames
(self time and inclusive time) and writes flame graphs to bench/out/.

usage: profile.py [--size 4] [--kind memfd] [--seconds 10] [--rate 250]
(needs py-spy: pip install -e .[bench])
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Guest, install_signal_handlers, proc_io  # noqa: E402

from vmcorefs.testing import DRGN_KALLSYMS, Mount, close_all  # noqa: E402

HERE = Path(__file__).resolve().parent


def workload(kind: str, vmcore: str, seconds: float, counter: list[int]) -> None:
    fd = os.open(vmcore, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        rng = random.Random(1)
        buf = bytearray(1 << 20)
        deadline = time.monotonic() + seconds
        off = 0
        while time.monotonic() < deadline:
            for _ in range(200):
                if kind == "random-4k":
                    os.pread(fd, 4096, rng.randrange(size // 4096) * 4096)
                else:
                    n = os.preadv(fd, [buf], off)
                    off = 0 if n <= 0 or off + n >= size else off + n
                counter[0] += 1
    finally:
        os.close(fd)


def frame_name(frame: str) -> str:
    # raw format: "function (file:line)"; keep function and file base name.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    return f"{name} ({os.path.basename(where.split(':')[0])})" if where else name


#: Self-time categories, first match wins (frame name prefixes / file names).
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("idle: waiting for the next request (epoll_pwait)", ("epoll_pwait ", "epoll_wait ")),
    ("reply: writev to /dev/fuse (copies the data out)", ("writev ",)),
    ("guest memory: preadv", ("preadv", "pread")),
    ("request: read() from /dev/fuse", ("read (libc", "__libc_read ")),
    ("event-loop fd registration and other syscalls (epoll_ctl, syscall, getpid)",
     ("epoll_ctl ", "syscall ", "getpid ")),
    ("vmcorefs handler (fs.py, layout.py, memory.py, guest.py)",
     ("(fs.py)", "(layout.py)", "(memory.py)", "(guest.py)")),
]
OTHER = "pyfuse3 + asyncio/uvloop + interpreter glue (everything else)"


def categorise(frame: str) -> str:
    for name, keys in CATEGORIES:
        if any(frame.startswith(k) or frame.endswith(k) for k in keys):
            return name
    return OTHER


def summarise(raw: Path, us_per_read: float, top: int = 18) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";") if f]
        # Drop the thread header py-spy puts first.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        total += n
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    cats: collections.Counter[str] = collections.Counter()
    for f, c in own.items():
        cats[categorise(f)] += c
    out = [f"  {total} samples; by category (share of wall time, µs per client read):"]
    out += [f"    {100 * c / total:5.1f} %  {us_per_read * c / total:6.1f} µs  {name}"
            for name, c in sorted(cats.items(), key=lambda kv: -kv[1])]
    out.append("  self time:")
    out += [f"    {100 * c / total:5.1f} %  {f}" for f, c in own.most_common(top)]
    out.append("  inclusive time:")
    out += [f"    {100 * c / total:5.1f} %  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4)
    p.add_argument("--kind", default="memfd")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rate", type=int, default=250)
    p.add_argument("--out", default=str(HERE / "out"))
    a = p.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(pyspy):
        print("profile: py-spy missing (pip install -e .[bench])", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    install_signal_handlers()
    try:
        g = Guest(a.size, a.kind).wait_ready()
        with Mount(g, "--reads", "python", "--direct") as m:
            assert m.daemon_pid is not None
            # (1a)'s drgn: how many requests, of what size, at what cost each.
            io0 = proc_io(m.daemon_pid)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", DRGN_KALLSYMS, m.vmcore], check=True, capture_output=True)
            el = time.perf_counter() - t
            io1 = proc_io(m.daemon_pid)
            replies = io1["syscw"] - io0["syscw"]
            print(f"== drgn kallsyms + linux_banner on vmcore: {el:.2f} s, {replies} FUSE replies, "
                  f"{(io1['rchar'] - io0['rchar']) / max(replies, 1):.0f} bytes read per request (incl. the "
                  f"request itself), {1e6 * el / max(replies, 1):.1f} µs of wall time per request", flush=True)
            for kind in ("random-4k", "seq-1m"):
                # Without the profiler first: requests and system calls per request.
                counter = [0]
                io0 = proc_io(m.daemon_pid)
                t = time.monotonic()
                workload(kind, m.vmcore, 3.0, counter)
                el = time.monotonic() - t
                io1 = proc_io(m.daemon_pid)
                syscr = io1["syscr"] - io0["syscr"]
                syscw = io1["syscw"] - io0["syscw"]
                print(f"== {kind}: {counter[0] / el:.0f} reads/s, {1e6 * el / counter[0]:.1f} µs per read; "
                      f"daemon per client read: {syscr / counter[0]:.2f} read syscalls, "
                      f"{syscw / counter[0]:.2f} write syscalls, "
                      f"{(io1['rchar'] - io0['rchar']) / counter[0] / 1024:.0f} KiB read", flush=True)
                raw = Path(a.out) / f"profile-{kind}.txt"
                svg = Path(a.out) / f"profile-{kind}.svg"
                us_per_read = 1e6 * el / counter[0]
                counter = [0]
                th = threading.Thread(target=workload, args=(kind, m.vmcore, a.seconds + 2, counter))
                th.start()
                time.sleep(0.5)
                common = ["-p", str(m.daemon_pid), "-d", str(int(a.seconds)), "-r", str(a.rate), "--native", "--idle"]
                r = subprocess.run([pyspy, "record", *common, "-f", "raw", "-o", str(raw)], capture_output=True, text=True)
                if r.returncode != 0:
                    print(r.stdout[-1500:], r.stderr[-1500:])
                th.join()
                th = threading.Thread(target=workload, args=(kind, m.vmcore, a.seconds / 2 + 2, [0]))
                th.start()
                time.sleep(0.5)
                common[3] = str(max(1, int(a.seconds) // 2))
                subprocess.run([pyspy, "record", *common, "-f", "flamegraph", "-o", str(svg)], capture_output=True)
                th.join()
                print(summarise(raw, us_per_read), flush=True)
                print(f"  (flame graph: {svg})", flush=True)
    finally:
        close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
