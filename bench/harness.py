"""Guests, mounts and host-memory probes for the benchmark suite.

Guests and mounts are the integration tests' (:mod:`vmcorefs.testing`):
Debian's cloud kernel and the busybox initramfs from
``scripts/build-guest.sh``, TCG, ``-device vmcoreinfo`` and two QMP sockets
(one for vmcorefs or drgn, one for the benchmark's own commands and events).

Everything here cleans up after itself: a :class:`Guest` is killed and a
:class:`~vmcorefs.testing.Mount` unmounted in ``close()``/``__exit__``, and
:func:`~vmcorefs.testing.close_all`
(called from ``run.py``'s ``finally`` and on SIGTERM) closes whatever is
still open, including scratch files in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from vmcorefs.testing import GuestSpec, QemuGuest, Unavailable
from vmcorefs.testing.guests import LIVE, MemoryKind

GiB = 1 << 30
#: How QEMU 7.2 names the memfd of memory-backend-memfd (in /proc/PID/maps and fd links).
MEMFD_NAME = "/memfd:memory-backend-memfd"
MiB = 1 << 20


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C: unwind through the finally blocks."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


# -- host memory ------------------------------------------------------------

def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            parts = v.split()
            out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def proc_status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/PID/status, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("Vm", "Rss")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def proc_io(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def shm_free() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


def host_free() -> int:
    """What we may still use: MemAvailable (the tmpfs limit is checked apart)."""
    return meminfo()["MemAvailable"]


def _mem_total() -> int:
    return meminfo()["MemTotal"]


def boot_cost(size_gib: int) -> int:
    """Host memory a freshly booted guest takes (measured: ~1.8 % of its RAM
    for struct pages the guest kernel initialises, plus ~0.4 GiB)."""
    return int(size_gib * GiB * 0.02) + 400 * MiB


# -- guests ---------------------------------------------------------------------

class Guest(QemuGuest):
    """A TCG guest (:mod:`vmcorefs.testing`) with ``size_gib`` GiB of RAM,
    ``kind`` "memfd" or "private", and where its RAM lives on the host;
    ``vmcoreinfo=False``: no ``-device vmcoreinfo`` (vmcorefs finds
    VMCOREINFO in guest RAM)."""

    def __init__(self, size_gib: int, kind: str, smp: int = 2, vmcoreinfo: bool = True) -> None:
        if kind not in ("memfd", "private"):
            raise ValueError(kind)
        self.size_gib, self.kind = size_gib, kind
        self.note: str | None = None
        memory: MemoryKind = "memfd" if kind == "memfd" else "private"
        if kind == "private" and size_gib * GiB >= _mem_total():
            # `-m 64G` alone fails here: the kernel's heuristic overcommit
            # refuses one private mapping larger than the host's RAM.
            memory = "private-noreserve"
            self.note = "memory-backend-ram,reserve=off (-m alone exceeds the host's overcommit limit)"
        spec = GuestSpec(f"bench-{size_gib}g-{kind}{'' if vmcoreinfo else '-novci'}", memory=memory,
                         mib=size_gib * 1024, vcpus=smp, vmcoreinfo=vmcoreinfo)
        spec = dataclasses.replace(spec, console=True)  # fill() types on it
        try:
            super().__init__(spec)
        except Unavailable as e:
            raise SystemExit(f"bench: {e} (make setup)") from None

    def fill(self, mib: int, timeout: float = 1200) -> float:
        """Type on the guest's console: mount a tmpfs at /fill and write
        ``mib`` MiB of /dev/urandom into it (guest RAM really in use,
        incompressible: what a dump must move); seconds until the guest
        said it was done.  Raises RuntimeError when dd failed."""
        start = len(self.serial.read_bytes())
        t = time.perf_counter()
        # The marker is split in the typed line ('FILL''ED'): only echo's output has it whole.
        self.send_console(f"mkdir -p /fill && mount -t tmpfs -o size={mib + 64}m fill /fill"
                          f" && dd if=/dev/urandom of=/fill/data bs=1M count={mib} 2>/dev/null;"
                          f" echo FILL''ED-$?\n".encode())
        while True:
            m = re.search(rb"FILLED-(\d+)", self.serial.read_bytes()[start:])
            if m:
                if m.group(1) != b"0":
                    raise RuntimeError(f"guest fill of {mib} MiB failed (exit {m.group(1).decode()})")
                return time.perf_counter() - t
            if time.perf_counter() - t > timeout:
                raise RuntimeError(f"guest fill of {mib} MiB not done in {timeout:.0f} s")
            time.sleep(0.2)

    def memfd_fd(self) -> str:
        """/proc/PID/fd/N of the guest's memfd backend (the physical limit)."""
        base = f"/proc/{self.pid}/fd"
        for n in os.listdir(base):
            with contextlib.suppress(OSError):
                if os.readlink(f"{base}/{n}").startswith(MEMFD_NAME):
                    return f"{base}/{n}"
        raise RuntimeError("memfd backend not found among QEMU's descriptors")

    def memfd_bytes(self) -> int:
        """Host memory the guest's memfd holds (its allocated blocks)."""
        return os.stat(self.memfd_fd()).st_blocks * 512

    def maps(self) -> list[tuple[int, int, int, str]]:
        out = []
        with open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                p = line.split(maxsplit=5)
                a, b = (int(x, 16) for x in p[0].split("-"))
                out.append((a, b, int(p[2], 16), p[5].strip() if len(p) > 5 else ""))
        return out

    def backing_for(self, gpa: int) -> tuple[str, int]:
        """(path, offset) at which a backing read of ``gpa`` happens: the memfd
        (memfd guests) or /proc/PID/mem at the host address (private guests)."""
        hva = self.gpa2hva(gpa)
        if self.kind == "memfd":
            for a, b, off, path in self.maps():
                if a <= hva < b and path.startswith(MEMFD_NAME):
                    return self.memfd_fd(), off + hva - a
            raise RuntimeError(f"gpa {gpa:#x} is not in the memfd")
        return f"/proc/{self.pid}/mem", hva


class ScratchFile:
    """A file removed at close (``/dev/shm`` dumps, makedumpfile output)."""

    def __init__(self, directory: str, name: str) -> None:
        self.path = os.path.join(directory, f"vmcorefs-bench-{os.getpid()}-{name}")
        LIVE.append(self)

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(ValueError):
            LIVE.remove(self)

    def __enter__(self) -> "ScratchFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dd(path: str | Path, bs: int, count_bytes: int, skip_bytes: int = 0) -> float:
    """Seconds ``dd`` takes to read ``count_bytes`` of ``path`` in ``bs`` blocks."""
    cmd = ["dd", f"if={path}", "of=/dev/null", f"bs={bs}", f"count={count_bytes}",
           f"skip={skip_bytes}", "iflag=count_bytes,skip_bytes", "status=none"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t
