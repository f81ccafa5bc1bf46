"""The command line against real guests: what a user sees when a command is
interrupted, refused or warned, and that the guest is left as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vmcorefs.testing import QemuGuest, daemon_pid, is_mounted, run_vmcorefs, spawn_vmcorefs, unmount_and_wait

pytestmark = pytest.mark.integration


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmcorefs: "), stderr
    return lines[0]


@pytest.mark.parametrize("command, signum", [("info", signal.SIGINT), ("dump", signal.SIGINT),
                                             ("dump", signal.SIGTERM)])
def test_interrupted_while_connecting(memfd_guest: QemuGuest, tmp_path: Path, command: str, signum: int) -> None:
    """Ctrl-C (SIGTERM) while ``info`` or ``dump`` starts or waits for a
    monitor that does not answer (QEMU stopped): one line, 128 + the signal;
    the guest runs on and its monitor takes the next client."""
    g = memfd_guest
    assert g.status() == "running"
    out = tmp_path / "vm.elf"
    os.kill(g.pid, signal.SIGSTOP)
    try:
        p = spawn_vmcorefs(command, g.qmp_path, *([str(out)] if command == "dump" else []),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)  # started, and most likely waiting for the greeting (5 s at most)
            p.send_signal(signum)
            _, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    finally:
        os.kill(g.pid, signal.SIGCONT)
    assert _one_line(err) == f"vmcorefs: interrupted by {signal.Signals(signum).name}"
    assert p.returncode == 128 + signum
    assert list(tmp_path.iterdir()) == []
    assert g.status() == "running"
    r = run_vmcorefs("info", g.qmp_path)
    assert r.returncode == 0, r.stderr


def test_memory_shared_on_private_ram_is_a_usage_error(private_guest: QemuGuest, tmp_path: Path) -> None:
    """``--memory shared`` for a guest whose RAM is QEMU's private memory:
    the guest cannot do what the option asks -- exit 2, one line saying why
    and what to use instead; no mount, no dump, the guest running."""
    g = private_guest
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    expected = ("vmcorefs: --memory shared: guest RAM 'pc.ram' at 0x0 is not in a shared file mapping (give QEMU"
                " memory-backend-memfd/-file with share=on, or use --memory procmem or auto)")
    for args in (["mount", "--memory", "shared", g.qmp_path, str(mnt)],
                 ["mount", "-f", "--memory", "shared", g.qmp_path, str(mnt)],
                 ["dump", "--memory", "shared", g.qmp_path, str(tmp_path / "vm.elf")]):
        r = run_vmcorefs(*args)
        assert (r.returncode, _one_line(r.stderr)) == (2, expected), args
        assert not is_mounted(mnt)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]
        assert g.status() == "running"


def test_mount_over_a_non_empty_directory(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    """A mount over a directory with files in it is made (as fusermount3
    makes it) with one warning line; the files are back at the unmount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "notes.txt").write_text("kept")
    r = run_vmcorefs("mount", memfd_guest.qmp_path, str(mnt))
    pid = daemon_pid(mnt)
    try:
        assert r.returncode == 0, r.stderr
        assert _one_line(r.stderr) == f"vmcorefs: {mnt} is not empty: its files are hidden while mounted"
        names = os.listdir(mnt)
        assert "vmcore" in names and "notes.txt" not in names
    finally:
        unmount_and_wait(mnt, pid)
    assert os.listdir(mnt) == ["notes.txt"]
    assert (mnt / "notes.txt").read_text() == "kept"
