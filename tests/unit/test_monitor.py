"""The QMP monitor's diagnoses against small local servers (no QEMU)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vmcorefs.errors import MonitorBusyError, NotQMPError, QMPTimeoutError, UsageError
from vmcorefs.qemu.monitor import connect, process_state, stopped_why

LISTENER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(4)
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def listener(tmp_path: Path) -> Any:
    """A child process listening on a unix socket, greeting no one."""
    path = tmp_path / "silent.sock"
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc, path
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_process_state(listener: Any) -> None:
    proc, _ = listener
    assert process_state(proc.pid) in ("S", "R")
    assert stopped_why(proc.pid) is None
    os.kill(proc.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while process_state(proc.pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stopped_why(proc.pid) == "stopped (SIGSTOP)"
    os.kill(proc.pid, signal.SIGCONT)
    assert stopped_why(None) is None
    assert process_state(2 ** 22 + 12345) is None  # above pid_max: no such process


def test_greeting_from_a_stopped_process(listener: Any) -> None:
    """No greeting from a stopped process: it is said to be stopped (pid,
    how to resume it), not busy and not "not QMP"; running, it is not QMP."""
    proc, path = listener
    with pytest.raises(NotQMPError):
        asyncio.run(connect(str(path), greeting_timeout=0.3))
    os.kill(proc.pid, signal.SIGSTOP)
    with pytest.raises(QMPTimeoutError) as e:
        asyncio.run(connect(str(path), greeting_timeout=0.3))
    assert not isinstance(e.value, MonitorBusyError)
    name = Path(f"/proc/{proc.pid}/comm").read_text().strip()
    assert str(e.value) == (f"{path}: the process listening ({name}, pid {proc.pid}) is stopped (SIGSTOP):"
                            f" no answer to the QMP greeting within 0.3 s (kill -CONT {proc.pid} resumes it)")


def test_no_connection_taken_from_a_stopped_process(listener: Any) -> None:
    """A listener that takes no connection at all (its queue full: a QEMU
    stopped with clients already waiting) is tried until the greeting's
    time is up, then diagnosed the same way, its pid found from the socket
    (it is never connected to)."""
    proc, path = listener
    fillers: list[socket.socket] = []
    try:
        while len(fillers) < 100:  # fill its queue of connections
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        with pytest.raises(UsageError) as e:
            asyncio.run(connect(str(path), greeting_timeout=0.3))
        assert type(e.value) is UsageError
        assert str(e.value) == (f"{path}: cannot connect: no connection taken within 0.3 s"
                                " (the listener's queue is full)")
        os.kill(proc.pid, signal.SIGSTOP)
        with pytest.raises(QMPTimeoutError) as e2:
            asyncio.run(connect(str(path), greeting_timeout=0.3))
        name = Path(f"/proc/{proc.pid}/comm").read_text().strip()
        assert str(e2.value) == (f"{path}: the process listening ({name}, pid {proc.pid}) is stopped (SIGSTOP):"
                                 f" no connection taken within 0.3 s (kill -CONT {proc.pid} resumes it)")
    finally:
        for s in fillers:
            s.close()
