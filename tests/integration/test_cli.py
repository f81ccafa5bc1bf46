"""The command line against real guests: what a user sees when a command is
interrupted, refused or warned, and that the guest is left as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vmcorefs.testing import QemuGuest, run_vmcorefs, spawn_vmcorefs

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
