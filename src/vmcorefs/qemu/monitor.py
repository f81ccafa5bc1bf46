"""The QMP connection to QEMU (through qemu.qmp), with timeouts and errors.

QMP serves one client per monitor: a second client's connection is accepted
by the kernel but never greeted.  :func:`connect` tells the cases apart with
``SO_PEERCRED`` (the listening process) so the user learns whether the
socket is not QMP, the monitor is busy, or QEMU is stopped (``/proc/PID/stat``).
Every command has a timeout, so a stopped QEMU (SIGSTOP) fails a request
instead of hanging it -- once: QMP answers in order, so after a command timed
out unanswered the next ones wait only briefly (see :meth:`Monitor.execute`).
HMP command lines are only ever built from validated integers (see
:meth:`Monitor.gpa2hva`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterator

import qemu.qmp
from qemu.qmp import EventListener, QMPClient
from qemu.qmp.message import Message

from vmcorefs.errors import (
    MonitorBusyError,
    NotQMPError,
    QEMUGoneError,
    QMPError,
    QMPTimeoutError,
    UsageError,
    VmcorefsError,
    stat_or_usage_error,
)

log = logging.getLogger(__name__)

GREETING_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0
#: Upper bound (seconds) on how long a command waits while QEMU has not yet
#: answered one that timed out (see :meth:`Monitor.execute`); at most a
#: quarter of that command's timeout.
STALL_GRACE = 1.0
_UCRED = struct.Struct("3i")
#: ``/proc/net/unix`` flag of a listening socket (the kernel's __SO_ACCEPTCON).
_SO_ACCEPTCON = 1 << 16


def peer_pid(sock: socket.socket) -> int | None:
    """PID of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid = int(_UCRED.unpack(raw)[0])
    return pid if pid > 0 else None


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` in ``/proc/PID/stat`` (``R``,
    ``S``, ``T`` stopped, ``t`` stopped by its tracer, ...); None when it
    cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    end = data.rfind(b")")  # the name (comm) may hold spaces and parentheses
    fields = data[end + 1:].split() if end >= 0 else []
    return fields[0].decode("ascii", "replace") if fields else None


def stopped_why(pid: int | None) -> str | None:
    """Why process ``pid`` does not run (``stopped (SIGSTOP)``, ``stopped
    by a debugger (ptrace)``), or None when it is not stopped or unknown."""
    if pid is None:
        return None
    state = process_state(pid)
    if state == "T":
        return "stopped (SIGSTOP)"
    if state == "t":
        return "stopped by a debugger (ptrace)"
    return None


def check_socket_path(path: str) -> None:
    """Raise :class:`UsageError` unless ``path`` is an existing unix socket."""
    st = stat_or_usage_error(path, "no such QMP socket")
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path}: not a unix socket (give the path of QEMU's -qmp unix: socket)")


def _no_event(event: Message) -> bool:
    return False


class _Listener(EventListener):
    """An ``EventListener`` that keeps no history (qemu.qmp's records every
    event it ever accepted, which grows a long-lived daemon)."""

    async def put(self, event: Message) -> None:
        await super().put(event)
        self._history.clear()


@dataclass
class _Stall:
    """A command that timed out and that QEMU has not answered yet."""

    command: str
    #: Its qemu.qmp execution, still waiting for QEMU's answer.
    task: asyncio.Future[Any]
    #: ``time.monotonic()`` when it timed out.
    since: float
    #: Its timeout (seconds): commands sent within that long after ``since``
    #: wait only the grace (:meth:`Monitor.execute`).
    window: float


class Monitor:
    """A connected QMP monitor.  Use :func:`connect` to make one."""

    def __init__(self, client: QMPClient, sock: socket.socket, path: str, pid: int | None,
                 timeout: float = COMMAND_TIMEOUT) -> None:
        self._client = client
        self._sock = sock
        #: Seconds any command may take before it fails with QMPTimeoutError.
        self.timeout = timeout
        self.path = path
        #: PID of the QEMU process, from SO_PEERCRED (None if not visible).
        self.pid = pid
        #: The greeting's QEMU version, e.g. "7.2.19".
        self.version = "unknown"
        try:
            v: Any = client.greeting.QMP.version["qemu"]  # type: ignore[union-attr]
            self.version = f"{v['major']}.{v['minor']}.{v['micro']}"
        except (AttributeError, KeyError, TypeError):
            pass
        self.gone = False
        #: The command QEMU is stuck on, while it has not answered it.
        self._stall: _Stall | None = None

    def _answered(self, task: asyncio.Future[Any]) -> None:
        """Done callback of a command that timed out: QEMU answered at last
        (or the connection closed), so it is no longer stuck."""
        if not task.cancelled():
            task.exception()  # retrieved: never "exception was never retrieved"
        self._stall = None

    def _no_answer(self, waited: float) -> str:
        """Why a command got no answer within ``waited`` seconds, in words."""
        why = stopped_why(self.pid)
        if why is not None:
            return f"no answer within {waited:g} s: QEMU (pid {self.pid}) is {why}"
        if self.pid is None:
            return f"no answer within {waited:g} s (is QEMU stopped or hung?)"
        return f"no answer within {waited:g} s from QEMU (pid {self.pid}): is it stopped or hung?"

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """Run a QMP command and return its ``return`` value (JSON as Python).

        ``timeout`` in seconds (default: the monitor's).  Raises
        :class:`QMPError` when QEMU answers with an error (its ``desc``),
        :class:`QMPTimeoutError` after ``timeout`` s without an answer,
        :class:`QEMUGoneError` when the connection is lost (and on every
        later call).

        A command that times out stays pending (its answer, when QEMU
        sends it, is taken and dropped).  Until QEMU answers it, and for
        its ``timeout`` after it timed out, a new command waits at most
        ``STALL_GRACE`` (a quarter of that timeout at most) unless QEMU
        answers the stuck one meanwhile: QMP answers in order, so QEMU
        could only answer the new one after that, and a request that
        needs several commands (an attribute refresh then an open, a
        failed snapshot then the ``--freeze`` resume) fails after one
        timeout, not one per command.  A command sent later, or once
        QEMU has answered, waits the whole timeout again (a QEMU that was
        only slow recovers).
        """
        timeout = self.timeout if timeout is None else timeout
        if self.gone:
            raise QEMUGoneError("QEMU has exited", command)
        start = time.monotonic()
        stall = self._stall
        if stall is not None and start - stall.since >= stall.window:
            stall = None  # a later request: it gets the whole timeout
        waited = timeout if stall is None else min(timeout, STALL_GRACE, stall.window / 4)
        task = asyncio.ensure_future(self._client.execute(command, arguments))
        try:
            if stall is None:
                await asyncio.wait({task}, timeout=waited)
            else:
                await asyncio.wait({task, stall.task}, timeout=waited, return_when=asyncio.FIRST_COMPLETED)
                if not task.done() and stall.task.done():
                    # QEMU answers again: this command gets its whole timeout.
                    stall, waited = None, timeout
                    await asyncio.wait({task}, timeout=max(0.0, start + timeout - time.monotonic()))
        except BaseException:  # cancelled: the command goes too, as with wait_for
            task.cancel()
            raise
        if not task.done():
            task.add_done_callback(self._answered)
            message = self._no_answer(waited)
            if stall is None:
                self._stall = _Stall(command, task, time.monotonic(), timeout)
            else:
                sent = time.monotonic() - stall.since + stall.window
                message += f"; nor to {stall.command}, sent {sent:.1f} s ago"
            raise QMPTimeoutError(message, command)
        try:
            result = task.result()
            self._stall = None
            return result
        except qemu.qmp.ExecuteError as e:
            self._stall = None
            raise QMPError(str(e.error.error.desc), command) from None
        except (qemu.qmp.QMPError, OSError, EOFError) as e:
            self.gone = True
            raise QEMUGoneError(f"monitor connection lost ({type(e).__name__})", command) from None

    async def hmp(self, command_line: str) -> str:
        """Run an HMP command line through QMP ``human-monitor-command``;
        its text output.  Raises as :meth:`execute`, and :class:`QMPError`
        when the answer is not text."""
        out = await self.execute("human-monitor-command", {"command-line": command_line})
        if not isinstance(out, str):
            raise QMPError("answer is not text", "human-monitor-command")
        return out

    async def gpa2hva(self, gpa: int) -> str:
        """HMP ``gpa2hva`` of guest-physical ``gpa`` (an integer, never user
        text): QEMU's answer, parsed by
        :func:`vmcorefs.core.memmap.parse_gpa2hva`.  Raises ``ValueError``
        for an address outside ``[0, 2**64)``, else as :meth:`hmp`."""
        if not isinstance(gpa, int) or gpa < 0 or gpa >= 1 << 64:
            raise ValueError(f"bad guest-physical address {gpa!r}")
        return await self.hmp(f"gpa2hva {gpa:#x}")

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        """QMP events ``names`` (e.g. ``RESUME``) as they arrive, for the
        ``with`` block: a qemu.qmp ``EventListener`` (``async for``,
        ``clear()``)."""
        listener = _Listener(names)
        with self._client.listen(listener):
            yield listener

    def send_fd(self, fd: int) -> None:
        """Pass ``fd`` to QEMU (SCM_RIGHTS); a following ``getfd`` names it.

        Done on the connection's own socket, exactly as qemu.qmp's
        ``send_fd_scm`` does (one whitespace byte carrying the descriptor),
        because that method only works on asyncio's default event loop.
        """
        try:
            self._sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        except OSError as e:
            self.gone = True
            raise QEMUGoneError(f"cannot pass a file descriptor ({e.strerror})", "getfd") from None

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._client.disconnect(), 2.0)
        except (asyncio.TimeoutError, qemu.qmp.QMPError, OSError, EOFError):
            pass


async def connect(path: str, greeting_timeout: float = GREETING_TIMEOUT,
                  timeout: float = COMMAND_TIMEOUT) -> Monitor:
    """Connect to the QMP unix socket at ``path`` and negotiate capabilities.

    ``greeting_timeout``: seconds to wait for QMP's greeting;
    ``timeout``: seconds every later command may take.  Raises
    :class:`UsageError` (no such socket, not a socket, nobody listening),
    :class:`MonitorBusyError` (QEMU's monitor already has a client),
    :class:`QMPTimeoutError` (no greeting, or no connection taken: QEMU is
    stopped, e.g. SIGSTOP), :class:`NotQMPError` (no QMP greeting from a
    non-QEMU process).  When the listener takes no connection at all (its
    queue is full), connecting is tried again until ``greeting_timeout``.
    """
    check_socket_path(path)
    deadline = time.monotonic() + greeting_timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(greeting_timeout)
            sock.connect(path)
            sock.setblocking(False)
            break
        except BlockingIOError:
            # Its queue of connections is full (EAGAIN): the listener takes
            # none now -- stopped, or its monitor busy and others waiting.
            sock.close()
            if time.monotonic() >= deadline:
                raise _silence(path, _listener_pid(path), greeting_timeout, accepted=False) from None
            await asyncio.sleep(0.1)
        except ConnectionRefusedError:
            sock.close()
            raise UsageError(f"{path}: connection refused (no process is listening; has QEMU exited?)") from None
        except OSError as e:
            sock.close()
            raise UsageError(f"{path}: cannot connect: {e.strerror or e}") from None
    pid = peer_pid(sock)
    client = QMPClient("vmcorefs")
    # qemu.qmp's default listener queues (and records) every event for ever
    # and vmcorefs never reads it: a daemon would grow with each event
    # (a dump per open, STOP/RESUME under --freeze).
    client.events.event_filter = _no_event
    try:
        await asyncio.wait_for(client.connect(sock), greeting_timeout)
    except asyncio.TimeoutError:
        await _abandon(client, sock)
        raise _silence(path, pid, greeting_timeout, accepted=True) from None
    except (qemu.qmp.QMPError, OSError, EOFError) as e:
        await _abandon(client, sock)
        raise NotQMPError(f"{path}: not a QMP monitor ({_describe(e)})") from None
    return Monitor(client, sock, path, pid, timeout)


def _silence(path: str, pid: int | None, waited: float, accepted: bool) -> VmcorefsError:
    """The error for a process listening at ``path`` (``pid``, None if not
    known) that said nothing for ``waited`` seconds: it took our connection
    but sent no greeting (``accepted``), or took no connection at all.  A
    QEMU that is stopped does either, like a monitor busy with a client:
    the state of its process tells them apart."""
    name = _process_name(pid) if pid else ""
    silence = "no answer to the QMP greeting" if accepted else "no connection taken"
    why = stopped_why(pid)
    if why is not None:
        who = f"QEMU (pid {pid})" if "qemu" in name or not name else f"the process listening ({name}, pid {pid})"
        hint = f" (kill -CONT {pid} resumes it)" if why.endswith("(SIGSTOP)") else ""
        return QMPTimeoutError(f"{path}: {who} is {why}: {silence} within {waited:g} s{hint}")
    if "qemu" in name:
        waiting = "did not greet" if accepted else "took no connection"
        others = "" if accepted else " and others waiting"
        return MonitorBusyError(
            f"{path}: the monitor of QEMU (pid {pid}) {waiting} within {waited:g} s:"
            f" it already has a client{others} (QMP serves one at a time; give QEMU another -qmp socket)")
    if accepted:
        return NotQMPError(f"{path}: not a QMP monitor (no QMP greeting within {waited:g} s)")
    return UsageError(f"{path}: cannot connect: {silence} within {waited:g} s (the listener's queue is full)")


def _listener_pid(path: str) -> int | None:
    """PID of a process holding the listening unix socket bound at ``path``
    (found in ``/proc/net/unix``, then among the descriptors of the
    processes this user may see), or None.  For diagnoses only: it reads
    every visible process's descriptors."""
    names = {path, os.path.abspath(path), os.path.realpath(path)}
    links = set()
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f, None)  # Num RefCount Protocol Flags Type St Inode Path
            for line in f:
                fields = line.split(None, 7)
                if len(fields) == 8 and fields[7].rstrip("\n") in names and int(fields[3], 16) & _SO_ACCEPTCON:
                    links.add(f"socket:[{fields[6]}]")
    except (OSError, ValueError):
        return None
    if not links:
        return None
    with os.scandir("/proc") as procs:
        for proc in procs:
            if not proc.name.isdigit():
                continue
            try:
                with os.scandir(f"/proc/{proc.name}/fd") as fds:
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            if os.readlink(fd.path) in links:
                                return int(proc.name)
            except OSError:
                continue
    return None


def _describe(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:160]


async def _abandon(client: QMPClient, sock: socket.socket) -> None:
    try:
        await asyncio.wait_for(client.disconnect(), 1.0)
    except (asyncio.TimeoutError, qemu.qmp.QMPError, OSError, EOFError):
        pass
    sock.close()
