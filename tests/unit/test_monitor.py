"""The QMP monitor's timeouts and diagnoses against small local servers (no QEMU).

A :class:`FakeQMP` greets, then answers commands in order, as QEMU's
monitor does, but only while ``running`` is set: cleared, it reads commands
and answers none, like a stopped or hung QEMU.  Bounds on wall-clock time
are generous (a shared, busy machine): they tell one timeout from two.
"""

from __future__ import annotations

import asyncio
import json
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
from vmcorefs.qemu.monitor import Monitor, connect, process_state, stopped_why

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                    "capabilities": []}}
TIMEOUT = 1.0


class FakeQMP:
    """A QMP monitor on ``path`` in the running event loop (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.running = asyncio.Event()
        self.running.set()
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> FakeQMP:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = json.JSONDecoder()
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        buf = ""
        try:
            while data := await reader.read(65536):
                buf += data.decode()
                while True:
                    buf = buf.lstrip()
                    try:
                        req, end = decoder.raw_decode(buf)
                    except ValueError:
                        break
                    buf = buf[end:]
                    if req.get("execute") != "qmp_capabilities":
                        await self.running.wait()  # in order: nothing is answered past a stuck command
                    writer.write(json.dumps({"return": {}, "id": req.get("id")}).encode() + b"\r\n")
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def _timed(monitor: Monitor, command: str) -> tuple[float, BaseException | None]:
    t = time.monotonic()
    try:
        await monitor.execute(command)
    except QMPTimeoutError as e:
        return time.monotonic() - t, e
    return time.monotonic() - t, None


def test_after_a_timeout_the_next_command_waits_only_briefly(tmp_path: Path) -> None:
    """A hung monitor: the first command waits the whole timeout; the next
    one, sent at once (the open after an attribute refresh), fails within a
    fraction of it and says which command QEMU is stuck on."""
    async def go() -> None:
        async with FakeQMP(tmp_path / "qmp.sock") as qmp:
            monitor = await connect(str(qmp.path), timeout=TIMEOUT)
            try:
                qmp.running.clear()
                first, e1 = await _timed(monitor, "query-status")
                second, e2 = await _timed(monitor, "query-target")
                assert e1 is not None and e2 is not None
                assert first >= TIMEOUT * 0.9
                # The grace it waited is in its message (no upper wall-clock
                # bound: a busy host may stretch any wait).
                assert second >= 0.25 * 0.9
                assert str(e2).startswith("QMP query-target: no answer within 0.25 s")
                assert "nor to query-status, sent" in str(e2)
                assert f"(pid {os.getpid()})" in str(e1)
            finally:
                qmp.running.set()
                await monitor.close()
    asyncio.run(go())


def test_a_qemu_that_answers_again_gets_the_whole_timeout(tmp_path: Path) -> None:
    """The stuck command answered (QEMU was slow, or SIGCONT): the next
    commands are served as before; and one sent while QEMU is stuck, which
    QEMU then starts answering within the grace, waits for its answer."""
    async def go() -> None:
        async with FakeQMP(tmp_path / "qmp.sock") as qmp:
            monitor = await connect(str(qmp.path), timeout=TIMEOUT)
            try:
                qmp.running.clear()
                _, e = await _timed(monitor, "query-status")
                assert e is not None
                loop = asyncio.get_running_loop()
                loop.call_soon(qmp.running.set)  # QEMU answers again during the grace
                assert await monitor.execute("query-target") == {}
                qmp.running.clear()
                _, e = await _timed(monitor, "query-status")
                assert e is not None
                qmp.running.set()
                await asyncio.sleep(0.05)
                assert await monitor.execute("query-kvm") == {}
                # QEMU slow again: a full timeout, not the grace.
                qmp.running.clear()
                elapsed, e = await _timed(monitor, "query-status")
                assert e is not None and elapsed >= TIMEOUT * 0.9
            finally:
                qmp.running.set()
                await monitor.close()
    asyncio.run(go())


def test_a_later_command_waits_the_whole_timeout_again(tmp_path: Path) -> None:
    """Still stuck, but one timeout later (another open): QEMU is given the
    whole timeout again."""
    async def go() -> None:
        async with FakeQMP(tmp_path / "qmp.sock") as qmp:
            monitor = await connect(str(qmp.path), timeout=TIMEOUT)
            try:
                qmp.running.clear()
                _, e = await _timed(monitor, "query-status")
                assert e is not None
                await asyncio.sleep(TIMEOUT * 1.1)
                elapsed, e = await _timed(monitor, "query-status")
                assert e is not None and elapsed >= TIMEOUT * 0.9
                assert "nor to" not in str(e)
            finally:
                qmp.running.set()
                await monitor.close()
    asyncio.run(go())


def test_cancelled_command_is_withdrawn(tmp_path: Path) -> None:
    """A command whose caller is cancelled leaves no stall behind."""
    async def go() -> None:
        async with FakeQMP(tmp_path / "qmp.sock") as qmp:
            monitor = await connect(str(qmp.path), timeout=TIMEOUT)
            try:
                qmp.running.clear()
                task = asyncio.ensure_future(monitor.execute("query-status"))
                await asyncio.sleep(0.1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                elapsed, e = await _timed(monitor, "query-status")
                assert e is not None and elapsed >= TIMEOUT * 0.9
            finally:
                qmp.running.set()
                await monitor.close()
    asyncio.run(go())


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
