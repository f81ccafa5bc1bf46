"""``vmcorefs`` run as a user runs it, and its FUSE mounts, for tests and benchmarks.

The command runs in a fresh interpreter (``sys.executable -m vmcorefs``)
from the source tree this package was imported from.  A :class:`Mount` is
the real daemon mode: ``vmcorefs mount`` returns once the mount is ready and
leaves a daemon; leaving the ``with`` block unmounts it and waits until the
daemon has exited, so that the guest's monitor is free for the next client.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import vmcorefs
from vmcorefs.testing.guests import LIVE, QemuGuest

#: The source tree vmcorefs is imported from (PYTHONPATH of the commands run here).
SRC = Path(vmcorefs.__file__).resolve().parents[1]
#: ``vmcorefs`` as a command line.
VMCOREFS = [sys.executable, "-m", "vmcorefs"]
#: Seconds cleanup waits for an unmount or a daemon's exit before forcing it.
CLEANUP_TIMEOUT = 30.0


def wait_for(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05) -> None:
    """Poll ``cond`` until it is true; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not met within {timeout:g} s"
        time.sleep(interval)


def is_mounted(path: str | Path) -> bool:
    """Whether ``path`` is a mount point (of anything), per /proc/self/mountinfo."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def unmount(path: str | Path) -> None:
    """Lazily unmount ``path`` if it is mounted (cleanup after a failed test)."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)


def vmcorefs_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(SRC))


def run_vmcorefs(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``vmcorefs ARGS...`` to completion, output captured as text."""
    return subprocess.run([*VMCOREFS, *args], capture_output=True, text=True, timeout=timeout,
                          env=vmcorefs_env(), **kw)


def spawn_vmcorefs(*args: str, **kw: Any) -> subprocess.Popen[str]:
    """``vmcorefs ARGS...`` in the background (``mount -f``: a foreground daemon)."""
    return subprocess.Popen([*VMCOREFS, *args], env=vmcorefs_env(), text=True, **kw)


def wait_mounted(path: str | Path, daemon: subprocess.Popen[str] | None = None, timeout: float = 60.0) -> None:
    """Wait until ``path`` is mounted; AssertionError if ``daemon`` exits first or after ``timeout`` s."""
    def ready() -> bool:
        if daemon is not None:
            assert daemon.poll() is None, f"vmcorefs exited {daemon.returncode} before mounting"
        return is_mounted(path)
    wait_for(ready, timeout, f"mount of {path}")


def pids_where(match: Callable[[list[bytes]], bool]) -> list[int]:
    """PIDs of the processes whose command line (``argv`` as bytes) ``match`` accepts."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if match(argv):
            found.append(int(d))
    return found


def daemon_pid(mountpoint: str | Path) -> int | None:
    """PID of the ``vmcorefs mount`` daemon serving ``mountpoint``: the forked
    child of ``vmcorefs mount`` (same command line; the parent has exited
    once the mount was ready)."""
    needle = str(mountpoint).encode()
    found = pids_where(lambda argv: b"vmcorefs" in argv and b"mount" in argv and needle in argv)
    if len(found) > 1:
        raise RuntimeError(f"{len(found)} vmcorefs daemons serve {mountpoint}: {found}")
    return found[0] if found else None


def exited(pid: int) -> bool:
    """Whether process ``pid`` has exited (gone, or a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith(("Z", "X"))
    except OSError:
        return True


def unmount_and_wait(path: str | Path, pid: int | None) -> None:
    """Unmount ``path`` (``fusermount3 -u``, lazily if that fails) and wait
    until its daemon ``pid`` has exited: it holds the guest's monitor, which
    serves one client at a time.  Kills the daemon if it is still there
    after :data:`CLEANUP_TIMEOUT` seconds."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], check=False, capture_output=True)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not is_mounted(path), CLEANUP_TIMEOUT)
        unmount(path)
    if pid is not None:
        with contextlib.suppress(AssertionError):
            wait_for(lambda: exited(pid), CLEANUP_TIMEOUT)
        if not exited(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


class Mount:
    """``vmcorefs mount [options] SOCKET DIR`` of ``guest`` (its vmcorefs
    monitor unless ``socket``) on a fresh directory, for a ``with`` block.

    ``path`` is the mount point, ``daemon_pid`` the daemon's PID and
    ``mount_s`` the seconds ``vmcorefs mount`` took.  Raises RuntimeError
    (with vmcorefs' message) if the mount fails.
    """

    def __init__(self, guest: QemuGuest, *options: str, socket: str | None = None) -> None:
        self.guest = guest
        self.options = options
        self.socket = socket or guest.qmp_path
        self.path = Path(tempfile.mkdtemp(prefix="vmcorefs-mnt-"))
        self.daemon_pid: int | None = None
        self.mount_s: float | None = None

    def __enter__(self) -> Mount:
        LIVE.append(self)
        t = time.perf_counter()
        r = run_vmcorefs("mount", *self.options, self.socket, str(self.path), timeout=300)
        self.mount_s = time.perf_counter() - t
        if r.returncode != 0 or not is_mounted(self.path):
            self.close()
            raise RuntimeError(f"vmcorefs mount failed ({r.returncode}): {r.stderr.strip()}")
        self.daemon_pid = daemon_pid(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def vmcore(self) -> Path:
        return self.path / "vmcore"

    @property
    def pmem(self) -> Path:
        return self.path / "pmem"

    @property
    def kcore(self) -> Path:
        return self.path / "kcore"

    def stats(self) -> dict[str, Any]:
        """The read path's counters: the root's ``user.vmcorefs.stats`` (JSON)."""
        return dict(json.loads(os.getxattr(self.path, "user.vmcorefs.stats")))

    def close(self) -> None:
        """Unmount, wait for the daemon to exit, remove the directory."""
        unmount_and_wait(self.path, self.daemon_pid)
        self.daemon_pid = None
        with contextlib.suppress(OSError):
            self.path.rmdir()
        with contextlib.suppress(ValueError):
            LIVE.remove(self)
