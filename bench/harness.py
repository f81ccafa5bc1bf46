"""Guests, mounts and host-memory probes for the benchmark suite.

Everything here cleans up after itself: a :class:`Guest` is killed and a
:class:`Mount` unmounted in ``close()``/``__exit__``, and :func:`cleanup_all`
(called from ``run.py``'s ``finally`` and on SIGTERM) closes whatever is
still open, including scratch files in ``/dev/shm``.

Guests are booted like the integration tests' (``tests/integration/
qemu_guest.py``): Debian's cloud kernel and the busybox initramfs from
``scripts/build-guest.sh``, TCG, ``-device vmcoreinfo`` and two QMP sockets
(one for vmcorefs or drgn, one for the benchmark's own commands and events).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("VMCOREFS_CACHE", "/var/cache/vmcorefs"))
GUEST_DIR = CACHE / "guest"
VMCOREFS = [sys.executable, "-m", "vmcorefs"]
GiB = 1 << 30
#: How QEMU 7.2 names the memfd of memory-backend-memfd (in /proc/PID/maps and fd links).
MEMFD_NAME = "/memfd:memory-backend-memfd"
MiB = 1 << 20

#: Objects still to close when the run ends (in reverse order).
_LIVE: list[Any] = []


def cleanup_all() -> None:
    while _LIVE:
        obj = _LIVE.pop()
        with contextlib.suppress(Exception):
            obj.close()


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


# -- guests -----------------------------------------------------------------

class Guest:
    """A TCG guest with ``size_gib`` GiB of RAM, ``kind`` "memfd" or "private"."""

    def __init__(self, size_gib: int, kind: str, smp: int = 2) -> None:
        kernel, initrd = GUEST_DIR / "vmlinuz", GUEST_DIR / "initramfs.cpio.gz"
        if not (kernel.exists() and initrd.exists()):
            raise SystemExit(f"bench: guest not built ({GUEST_DIR}); run scripts/setup.sh (make setup)")
        self.size_gib, self.kind = size_gib, kind
        self.note: str | None = None
        self.release = (GUEST_DIR / "release").read_text().strip()
        self.dir = Path(tempfile.mkdtemp(prefix=f"vmcorefs-bench-{size_gib}g-{kind}-"))
        self.qmp_path = str(self.dir / "qmp.sock")
        self.own_qmp_path = str(self.dir / "bench-qmp.sock")
        self.serial = self.dir / "serial.log"
        args = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64", "-smp", str(smp),
            "-display", "none", "-vga", "none", "-nodefaults", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 printk.devkmsg=on",
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.own_qmp_path},server=on,wait=off",
            "-device", "vmcoreinfo", "-m", f"{size_gib}G",
        ]
        if kind == "memfd":
            args += ["-object", f"memory-backend-memfd,id=mem0,size={size_gib}G,share=on",
                     "-machine", "pc,memory-backend=mem0"]
        elif kind == "private" and size_gib * GiB < _mem_total():
            args += ["-machine", "pc"]
        elif kind == "private":
            # `-m 64G` alone fails here ("cannot set up guest memory 'pc.ram':
            # Cannot allocate memory"): the kernel's heuristic overcommit refuses
            # one private mapping larger than the host's RAM.  The same private
            # anonymous RAM, mapped MAP_NORESERVE (QEMU >= 6.1):
            args += ["-object", f"memory-backend-ram,id=mem0,size={size_gib}G,reserve=off",
                     "-machine", "pc,memory-backend=mem0"]
            self.note = "memory-backend-ram,reserve=off (-m alone exceeds the host's overcommit limit)"
        else:
            raise ValueError(kind)
        self.args = args
        self.log = open(self.dir / "qemu.log", "wb")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self._qmp: QEMUMonitorProtocol | None = None
        self.boot_s: float | None = None
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> "Guest":
        deadline = time.monotonic() + 90 + self.size_gib / 2
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {(self.dir / 'qemu.log').read_text()[-2000:]}")
            if self.serial.exists() and b"VMCOREFS-GUEST-READY" in self.serial.read_bytes():
                self.boot_s = time.monotonic() - self.t_start
                return self
            time.sleep(0.1)
        raise TimeoutError(f"guest did not boot; serial: {self.serial.read_text()[-2000:]}")

    def qmp(self, command: str, **arguments: Any) -> Any:
        """A command on the benchmark's own monitor (never the one vmcorefs uses)."""
        if self._qmp is None:
            self._qmp = QEMUMonitorProtocol(self.own_qmp_path)
            self._qmp.connect()
        return self._qmp.cmd(command, **arguments)

    def hmp(self, line: str) -> str:
        return str(self.qmp("human-monitor-command", **{"command-line": line}))

    def events(self, wait: float = 0.0) -> list[dict[str, Any]]:
        assert self._qmp is not None
        return list(self._qmp.get_events(wait=wait) if wait else self._qmp.get_events())

    def clear_events(self) -> None:
        self.qmp("query-status")  # make sure we are connected
        assert self._qmp is not None
        self._qmp.get_events()
        self._qmp.clear_events()

    def gpa2hva(self, gpa: int) -> int:
        text = self.hmp(f"gpa2hva {gpa:#x}")
        return int(text.rsplit(" ", 1)[1], 16)

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def memfd_fd(self) -> str:
        """/proc/PID/fd/N of the guest's memfd backend (the physical limit)."""
        base = f"/proc/{self.pid}/fd"
        for n in os.listdir(base):
            with contextlib.suppress(OSError):
                if os.readlink(f"{base}/{n}").startswith(MEMFD_NAME):
                    return f"{base}/{n}"
        raise RuntimeError("memfd backend not found among QEMU's descriptors")

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

    def close(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)


# -- mounts -----------------------------------------------------------------

def is_mounted(path: str | Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def _daemon_pid(mountpoint: str) -> int | None:
    needle = mountpoint.encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        # The daemon is the forked child of `vmcorefs mount` (same command
        # line; the parent has exited once the mount was ready).
        if b"vmcorefs" in argv and b"mount" in argv and needle in argv:
            return int(d)
    return None


class Mount:
    """``vmcorefs mount`` (the real daemon mode) of ``guest`` on a fresh directory."""

    def __init__(self, guest: Guest, *options: str) -> None:
        self.guest = guest
        self.options = options
        self.path = tempfile.mkdtemp(prefix="vmcorefs-bench-mnt-")
        self.daemon_pid: int | None = None
        self.mount_s: float | None = None

    def __enter__(self) -> "Mount":
        _LIVE.append(self)
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        t = time.perf_counter()
        r = subprocess.run([*VMCOREFS, "mount", *self.options, self.guest.qmp_path, self.path],
                           capture_output=True, text=True, timeout=300, env=env)
        self.mount_s = time.perf_counter() - t
        if r.returncode != 0:
            self.close()
            raise RuntimeError(f"vmcorefs mount failed ({r.returncode}): {r.stderr.strip()}")
        self.daemon_pid = _daemon_pid(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def vmcore(self) -> str:
        return f"{self.path}/vmcore"

    def close(self) -> None:
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", self.path], check=False, capture_output=True)
            deadline = time.monotonic() + 10
            while is_mounted(self.path) and time.monotonic() < deadline:
                time.sleep(0.02)
            if is_mounted(self.path):
                subprocess.run(["fusermount3", "-u", "-z", self.path], check=False, capture_output=True)
        # The daemon must have let go of the QMP monitor (one client at a time).
        if self.daemon_pid is not None:
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{self.daemon_pid}") and time.monotonic() < deadline:
                try:
                    with open(f"/proc/{self.daemon_pid}/stat") as f:
                        if f.read().split(") ", 1)[1].startswith("Z"):
                            break
                except OSError:
                    break
                time.sleep(0.02)
            if os.path.exists(f"/proc/{self.daemon_pid}"):
                with contextlib.suppress(OSError):
                    os.kill(self.daemon_pid, signal.SIGKILL)
            self.daemon_pid = None
        with contextlib.suppress(OSError):
            os.rmdir(self.path)
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)


class ScratchFile:
    """A file removed at close (``/dev/shm`` dumps, makedumpfile output)."""

    def __init__(self, directory: str, name: str) -> None:
        self.path = os.path.join(directory, f"vmcorefs-bench-{os.getpid()}-{name}")
        _LIVE.append(self)

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)

    def __enter__(self) -> "ScratchFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dd(path: str, bs: int, count_bytes: int, skip_bytes: int = 0) -> float:
    """Seconds ``dd`` takes to read ``count_bytes`` of ``path`` in ``bs`` blocks."""
    cmd = ["dd", f"if={path}", "of=/dev/null", f"bs={bs}", f"count={count_bytes}",
           f"skip={skip_bytes}", "iflag=count_bytes,skip_bytes", "status=none"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t
