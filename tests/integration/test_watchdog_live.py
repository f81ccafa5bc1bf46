"""--freeze and a killed daemon: the watchdog (vmcorefs.watchdog) resumes a
guest that vmcorefs paused, and only that, on real QEMU and real FUSE."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from vmcorefs.testing import Mount, QemuGuest, is_mounted, wait_for
from vmcorefs.testing.mounts import exited, pids_where

pytestmark = pytest.mark.integration

#: Generous bound (seconds) for what should take well under 2 s: the host may be busy.
BOUND = 10.0


def _watchdog_of(daemon: int) -> int:
    """The watchdog child of the vmcorefs daemon ``daemon``."""
    def match(argv: list[bytes]) -> bool:
        return any(a.endswith(b"vmcorefs/watchdog.py") for a in argv)

    def children() -> list[int]:
        found = []
        for pid in pids_where(match):
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().split(") ", 1)[1].split()[1]) == daemon:
                        found.append(pid)
        return found

    # (A process inside execve has no command line for a moment.)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: len(children()) == 1, 2, "the watchdog")
    found = children()
    assert len(found) == 1, f"watchdogs of daemon {daemon}: {found}"
    return found[0]


def _vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _kill_daemon(m: Mount) -> tuple[int, float]:
    """SIGKILL the daemon's whole process group; (watchdog pid, time of the kill)."""
    assert m.daemon_pid is not None
    wd = _watchdog_of(m.daemon_pid)
    t = time.monotonic()
    os.killpg(os.getpgid(m.daemon_pid), signal.SIGKILL)
    wait_for(lambda: exited(m.daemon_pid or 0), BOUND, "daemon death")
    return wd, t


def _clear_dead_mount(m: Mount) -> None:
    subprocess.run(["fusermount3", "-u", str(m.path)], check=True, capture_output=True)
    assert not is_mounted(m.path)


def _kill_and_expect_paused(g: QemuGuest, m: Mount, fd: int | None = None) -> None:
    """SIGKILL the daemon: once its watchdog has exited the guest is still
    paused and was never resumed; then close ``fd`` and clear the mount."""
    g.clear_events()
    wd, _ = _kill_daemon(m)
    wait_for(lambda: exited(wd), BOUND, "watchdog exit")
    assert g.status() == "paused"
    assert not [e for e in g.events() if e["event"] == "RESUME"]
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    _clear_dead_mount(m)


@pytest.fixture
def g(memfd_guest: QemuGuest) -> Iterator[QemuGuest]:
    """The memfd guest, left running whatever the test did to it."""
    assert memfd_guest.status() == "running"
    yield memfd_guest
    if memfd_guest.status() != "running":
        memfd_guest.qmp("cont")


def test_sigkill_with_guest_frozen_resumes_it(g: QemuGuest) -> None:
    with Mount(g, "--freeze") as m:
        assert m.daemon_pid is not None
        wd = _watchdog_of(m.daemon_pid)
        # Its own session (a signal to the daemon's group misses it), tiny, no FUSE code.
        assert os.getsid(wd) == wd != os.getsid(m.daemon_pid)
        maps = Path(f"/proc/{wd}/maps").read_text()
        assert "pyfuse3" not in maps and "_readpath" not in maps and "fuse" not in maps
        rss = _vm_rss_kib(wd)
        print(f"\nwatchdog RSS {rss} KiB (daemon {_vm_rss_kib(m.daemon_pid)} KiB)")
        assert rss < 32 << 10
        fd = os.open(m.vmcore, os.O_RDONLY)
        assert g.status() == "paused"
        _, t = _kill_daemon(m)
        wait_for(lambda: g.status() == "running", BOUND, "guest resumed by the watchdog", interval=0.01)
        print(f"guest running again {time.monotonic() - t:.3f} s after the SIGKILL")
        wait_for(lambda: exited(wd), BOUND, "watchdog exit")
        with contextlib.suppress(OSError):
            os.close(fd)
        _clear_dead_mount(m)


def test_guest_paused_before_stays_paused(g: QemuGuest) -> None:
    g.qmp("stop")
    with Mount(g, "--freeze") as m:
        _kill_and_expect_paused(g, m, os.open(m.vmcore, os.O_RDONLY))


def test_normal_unmount_leaves_no_watchdog(g: QemuGuest) -> None:
    with Mount(g, "--freeze") as m:
        assert m.daemon_pid is not None
        wd = _watchdog_of(m.daemon_pid)
        with open(m.vmcore, "rb") as f:
            assert g.status() == "paused"
            assert f.read(4) == b"\x7fELF"
        wait_for(lambda: g.status() == "running", BOUND, "resume at the last close")
    wait_for(lambda: exited(wd), BOUND, "watchdog exit after the unmount")
    assert g.status() == "running"


def test_no_watchdog_without_freeze(g: QemuGuest) -> None:
    with Mount(g) as m:
        assert m.daemon_pid is not None
        with pytest.raises(AssertionError):
            _watchdog_of(m.daemon_pid)


def test_sigkill_without_freeze_in_force_leaves_guest_alone(g: QemuGuest) -> None:
    """The last word was 'resumed': a pause by someone else after it is kept."""
    with Mount(g, "--freeze") as m:
        with open(m.vmcore, "rb") as f:
            f.read(4)
        wait_for(lambda: g.status() == "running", BOUND, "resume at the last close")
        g.qmp("stop")  # the user's pause, not vmcorefs'
        _kill_and_expect_paused(g, m)


def test_user_resume_ends_our_pause(g: QemuGuest, tmp_path: Path) -> None:
    """Resumed by someone else while frozen, then paused again by them: that
    pause is theirs -- neither the watchdog nor the last close resumes it."""
    log = tmp_path / "daemon.log"
    with Mount(g, "--freeze", "--debug", "--log-file", str(log)) as m:
        fd = os.open(m.vmcore, os.O_RDONLY)
        assert g.status() == "paused"
        g.qmp("cont")
        wait_for(lambda: "pause is no longer ours" in log.read_text(), BOUND, "daemon saw the RESUME")
        g.qmp("stop")
        _kill_and_expect_paused(g, m, fd)
