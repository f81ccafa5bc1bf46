"""A guest left paused by a dead vmcorefs is resumed by a watchdog process.

With ``--freeze`` the daemon pauses the guest while a guest-memory file is
open and resumes it at the last close.  If the daemon dies without closing
(SIGKILL, the OOM killer), nothing inside it can resume the guest.  A
**watchdog** outside the daemon's process can:

* the daemon spawns it (:func:`start`) as a fresh, small interpreter
  running this file (``python -I .../vmcorefs/watchdog.py KIND ARGS...``;
  standard library only: no pyfuse3, no qemu.qmp, no asyncio) in its own session, so that signals
  sent to the daemon or its process group do not reach it, with its
  working directory at ``/`` (it pins no mount) and a pipe as stdin;
* the daemon writes one byte on the pipe per change of responsibility:
  :data:`PAUSED` (``P``) *before* it sends ``stop``, :data:`RESUMED`
  (``R``) once its ``cont`` succeeded (or a ``stop`` failed, or the pause
  stopped being its own);
* when the pipe closes (the daemon exited, however it exited) the watchdog
  looks at the last of those bytes: ``P`` means the guest may still be
  paused by vmcorefs, so it runs the resume action of the guest's kind
  (:data:`RESUMERS`), then exits; anything else and it exits at once.
* a writer of files (``vmcorefs dump``) also names each partial file it
  creates (:data:`REMOVE` ``F``, the path, a NUL) and says :data:`DONE`
  (``D``) once it has cleaned up by itself; a pipe that closes without
  ``D`` (SIGKILL, the OOM killer) has the watchdog remove those files
  after the resume.
* ``--quiet`` (how vmcorefs always starts it: the mount's or the dump's
  own error stays the one line): nothing is said when there was nothing to
  do (QEMU gone, the guest not paused); a resume, a removed file or a
  failure is still said.

The resume action for a QMP socket (:func:`resume_qmp`) connects to the
monitor the daemon held (QEMU serves one QMP client per monitor and takes
the next one once the daemon's descriptor is closed, which the kernel does
when the daemon dies), asks ``query-status`` and sends ``cont`` only if the
status is ``paused``.  For a libvirt domain (:func:`resume_libvirt`) it
asks libvirtd and calls ``virDomainResume`` only if the domain is paused by
a suspend; libvirt passes vmcorefs no events, so there a resume by someone
else during the freeze is not seen.

**Policy: whose pause is it?**  QEMU's ``query-status`` cannot say who
paused a guest.  The daemon follows the ``RESUME`` events of its monitor
(:class:`WatchedGuest`): once the guest was resumed by anyone while
vmcorefs held it paused, the pause is no longer vmcorefs' -- a later
``stop`` is someone else's -- so the daemon writes ``R``, and neither the
watchdog nor the daemon's own last close resumes it.  What cannot be seen:
a ``stop`` sent by someone else while vmcorefs already held the guest
paused (QEMU emits no event for a ``stop`` of a paused guest); the
watchdog then resumes the guest, as the daemon's last close would have.
A guest that was already paused when vmcorefs first opened a file is never
paused by vmcorefs (no ``P``) and so never resumed.  A guest in another
stopped state (``guest-panicked``, ``io-error``, ``shutdown``, ...) is left
alone: only ``paused`` is what vmcorefs' ``stop`` makes.

Reused by anything that pauses a guest for a while (``vmcorefs mount
--freeze``, a dump writer)::

    with watching(monitor) as watchdog:          # None: no resume action for this kind
        guest = WatchedGuest(guest, watchdog)    # pause()/resume() report to it
        ...
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

#: The byte the daemon writes before it pauses the guest (the pause may be its own from now on).
PAUSED = b"P"
#: The byte the daemon writes once no pause of its own is in force.
RESUMED = b"R"
#: ``F`` PATH ``\0``: remove PATH if the writer dies before :data:`DONE`.
REMOVE = b"F"
#: The writer cleaned up by itself: remove nothing.
DONE = b"D"
#: Seconds the watchdog tries to reach QEMU's monitor (QEMU greets the next
#: client once it has noticed the daemon's connection close).
RESUME_TIMEOUT = 10.0


# -- the watchdog process (standard library only) ------------------------------

def _qmp_exchange(sock: socket.socket, buf: bytearray, command: str | None, deadline: float) -> dict[str, Any]:
    """Send ``command`` (None: just read the greeting) and return QEMU's
    answer (``{"return": ...}``, ``{"error": ...}`` or the greeting),
    skipping events.  Raises OSError (TimeoutError after ``deadline``)."""
    if command is not None:
        sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
    while True:
        while b"\n" not in buf:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError(errno.ECONNRESET, "QEMU closed the monitor")
            buf += data
        line, _, rest = bytes(buf).partition(b"\n")
        buf[:] = rest
        msg = json.loads(line)
        if isinstance(msg, dict) and ("QMP" in msg or "return" in msg or "error" in msg):
            return msg


def resume_qmp(path: str, timeout: float = RESUME_TIMEOUT) -> str:
    """Resume the guest behind QMP socket ``path`` if ``query-status`` says
    ``paused``; what was done, as one line.  Waits up to ``timeout`` seconds
    for the monitor to greet (it is busy until QEMU notices the daemon's
    connection close).  Raises OSError when QEMU listens but does not
    answer in time."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.connect(path)
            buf = bytearray()
            _qmp_exchange(sock, buf, None, deadline)
            _qmp_exchange(sock, buf, "qmp_capabilities", deadline)
            status = _qmp_exchange(sock, buf, "query-status", deadline).get("return", {}).get("status")
            if status != "paused":
                return f"guest left {status} (not paused)"
            answer = _qmp_exchange(sock, buf, "cont", deadline)
            if "error" in answer:
                return f"cont failed: {answer['error'].get('desc', answer['error'])}"
            return "guest resumed (cont)"
        except (FileNotFoundError, ConnectionRefusedError):
            return "QEMU is gone (nothing to resume)"  # nobody listens on the socket
        except ConnectionResetError:
            # The monitor closed on us: try again while time is left.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            sock.close()


def resume_libvirt(uri: str, uuid: str) -> str:
    """Resume libvirt domain ``uuid`` of ``uri`` (``virDomainResume``) if
    libvirt says it is paused by a suspend (reason ``VIR_DOMAIN_PAUSED_USER``,
    what vmcorefs' ``virDomainSuspend`` makes); what was done, as one line.  The only action
    that is not standard library: it imports libvirt-python when it runs.
    Raises OSError when libvirt cannot be used."""
    try:
        import libvirt
    except ImportError as e:
        raise OSError(f"libvirt-python: {e}") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(uri)
        try:
            dom = conn.lookupByUUIDString(uuid)
            state, reason = dom.state()
            if state != libvirt.VIR_DOMAIN_PAUSED:
                return f"domain left in state {state} (not paused)"
            if reason != libvirt.VIR_DOMAIN_PAUSED_USER:  # an I/O error, a migration, a snapshot...
                return f"domain paused for another reason than a suspend ({reason}), left so"
            dom.resume()
            return "guest resumed (virDomainResume)"
        finally:
            conn.close()
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            return f"the domain is gone (nothing to resume): {e}"
        raise OSError(str(e)) from None


#: Resume actions by guest kind: ``RESUMERS[kind](*args)`` resumes the guest
#: if it is paused and says what it did.  The daemon chooses kind and args
#: (:func:`action_for`).
RESUMERS: dict[str, Callable[..., str]] = {
    "qmp": resume_qmp,
    "libvirt": resume_libvirt,
}


@dataclass
class Words:
    """What the daemon said on the pipe so far (:meth:`feed` it bytes)."""

    #: The last pause word was :data:`PAUSED`.
    paused: bool = False
    #: :data:`DONE` was said.
    done: bool = False
    #: Files named by :data:`REMOVE` (before any :data:`DONE`).
    files: list[bytes] = field(default_factory=list)
    _path: bytearray | None = None

    def feed(self, data: bytes) -> None:
        for i, byte in enumerate(data):
            if self._path is not None:
                if byte == 0:
                    self.files.append(bytes(self._path))
                    self._path = None
                else:
                    self._path.append(byte)
                continue
            word = data[i:i + 1]
            if word == PAUSED:
                self.paused = True
            elif word == RESUMED:
                self.paused = False
            elif word == REMOVE:
                self._path = bytearray()
            elif word == DONE:
                self.done = True
                self.files.clear()


#: Resume outcomes that did nothing (``--quiet`` says nothing about them).
_NOTHING_DONE = ("QEMU is gone", "guest left", "the domain is gone", "domain left")


def watch(fd: int, action: Sequence[str], quiet: bool = False) -> int:
    """The watchdog: read the daemon's words on ``fd`` until EOF, then run
    ``action`` (``[kind, *args]``) if the last pause word was
    :data:`PAUSED`, then remove the files named by :data:`REMOVE` unless
    :data:`DONE` was said.  ``quiet``: no line when nothing was done.
    Exit status: 0, or 1 when the resume failed."""
    words = Words()
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not data:
            break
        words.feed(data)
    status = 0
    said: list[str] = []
    if words.paused:
        kind, *args = action
        try:
            what = RESUMERS[kind](*args)
            if not (quiet and what.startswith(_NOTHING_DONE)):
                said.append(f"the guest was paused: {what}")
        except OSError as e:
            said.append(f"the guest was paused; cannot resume it: {e}")
            status = 1
    if not words.done:
        for path in words.files:
            try:
                os.unlink(path)
                said.append(f"removed {os.fsdecode(path)}")
            except FileNotFoundError:
                pass
            except OSError as e:
                said.append(f"cannot remove {os.fsdecode(path)}: {e.strerror}")
    if said:
        print(f"vmcorefs watchdog: vmcorefs exited; {'; '.join(said)}", file=sys.stderr)
    return status


def main(argv: Sequence[str]) -> int:
    """``python watchdog.py [--quiet] KIND ARGS...``, the daemon's pipe on stdin."""
    quiet = bool(argv) and argv[0] == "--quiet"
    if quiet:
        argv = argv[1:]
    if not argv or argv[0] not in RESUMERS:
        print(f"usage: python watchdog.py [--quiet] {{{','.join(RESUMERS)}}} ARGS... (the daemon's pipe on stdin)",
              file=sys.stderr)
        return 2
    # A signal sent to the daemon's session, terminal or service (SIGTERM to
    # every process of a systemd unit) must not take the watchdog with it:
    # it exits by itself once the daemon has gone.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    return watch(0, argv, quiet)


# -- the daemon's side --------------------------------------------------------

class Watchdog:
    """A running watchdog (:func:`start`), seen from the daemon.

    :meth:`paused` / :meth:`resumed` tell it who is responsible for the
    guest's pause; :meth:`close` lets it go (it exits, resuming the guest
    first if the last word was :meth:`paused`).  Never raises: a watchdog
    that died can only be logged.
    """

    def __init__(self, proc: subprocess.Popen[bytes], fd: int) -> None:
        self.proc = proc
        self._fd: int | None = fd
        #: The last byte written (``b""`` before any).
        self.last = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _write(self, byte: bytes) -> None:
        if byte != self.last and self._send(byte):
            self.last = byte

    def _send(self, data: bytes) -> bool:
        if self._fd is None:
            return False
        try:
            os.write(self._fd, data)  # a pipe write of up to PIPE_BUF bytes is whole
            return True
        except OSError as e:  # the watchdog died (EPIPE): nothing to tell
            print(f"vmcorefs: the --freeze watchdog (pid {self.pid}) is gone: {e.strerror}", file=sys.stderr)
            self.close()
            return False

    def paused(self) -> None:
        """The guest is about to be paused by us: resume it if we die."""
        self._write(PAUSED)

    def remove_on_death(self, path: str) -> None:
        """Remove ``path`` if we die before :meth:`done`."""
        self._send(REMOVE + os.fsencode(path) + b"\0")

    def done(self) -> None:
        """We cleaned up by ourselves: remove nothing."""
        self._send(DONE)

    def resumed(self) -> None:
        """No pause of ours is in force: leave the guest alone if we die."""
        self._write(RESUMED)

    def close(self) -> None:
        """Close the pipe: the watchdog exits (after resuming a pause of ours)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def start(action: Sequence[str], quiet: bool = True) -> Watchdog:
    """Spawn a watchdog that runs ``action`` (``[kind, *args]``, a key of
    :data:`RESUMERS` and its arguments) if this process exits while it said
    :meth:`Watchdog.paused` (``quiet``: see :func:`watch`).  Raises OSError
    when it cannot be spawned."""
    r, w = os.pipe()
    try:
        # The file, isolated (-I): no import of vmcorefs or site, whatever the caller's sys.path.
        proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), *(["--quiet"] if quiet else []),
                                 *action], stdin=r,
                                stdout=subprocess.DEVNULL, cwd="/", start_new_session=True, close_fds=True)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    return Watchdog(proc, w)


def action_for(monitor: object) -> list[str] | None:
    """The resume action for the guest behind ``monitor`` (``[kind, *args]``),
    or None when this kind of guest has none."""
    from vmcorefs.qemu.libvirt import LibvirtMonitor
    from vmcorefs.qemu.monitor import Monitor

    if isinstance(monitor, LibvirtMonitor):
        return ["libvirt", monitor.uri, monitor.uuid]
    if isinstance(monitor, Monitor):
        # Absolute: the watchdog runs in / (a socket path given relative to
        # the user's directory was not found there, and a dump killed or
        # failing with the guest paused left it paused).
        return ["qmp", os.path.abspath(monitor.path)]
    return None


@contextlib.contextmanager
def watching(monitor: object) -> Iterator[Watchdog | None]:
    """A watchdog for the guest behind ``monitor`` for the ``with`` block
    (None when its kind has no resume action); closed at the end."""
    action = action_for(monitor)
    watchdog = start(action) if action is not None else None
    try:
        yield watchdog
    finally:
        if watchdog is not None:
            watchdog.close()


class WatchedGuest:
    """A guest (:class:`vmcorefs.live.GuestControl`) whose :meth:`pause` and
    :meth:`resume` are reported to a :class:`Watchdog`; everything else is
    the wrapped guest's.

    With a QMP monitor, the guest's ``RESUME`` events are followed (call
    :meth:`follow_events` from the event loop): a resume by anyone while
    our pause is in force ends it (see the module's policy), and our later
    :meth:`resume` then leaves the guest alone.
    """

    def __init__(self, guest: Any, watchdog: Watchdog) -> None:
        self.guest = guest
        self.watchdog = watchdog
        #: A pause of ours is in force.
        self.ours = False
        self._resuming = False
        self._listener: Any = None
        self._task: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.guest, name)

    async def snapshot(self) -> Any:
        return await self.guest.snapshot()

    async def status(self) -> str:
        return str(await self.guest.status())

    async def pause(self) -> None:
        """Pause (``P`` first, so a death in between is covered); ``R`` again
        if QEMU refused.  A timeout or a cancellation (a signal) keeps ``P``
        and makes the pause ours: the stop was sent, QEMU may have done it
        or still do it, so :meth:`resume` must undo it."""
        import asyncio

        from vmcorefs.errors import QMPTimeoutError

        self.watchdog.paused()
        try:
            await self.guest.pause()
        except (QMPTimeoutError, asyncio.CancelledError):
            self.ours = True
            raise
        except BaseException:
            self.watchdog.resumed()
            raise
        if self._listener is not None:
            self._listener.clear()  # events before our stop's answer are not news
        self.ours = True

    async def resume(self) -> None:
        """Resume if the pause is still ours; ``R`` once done."""
        if not self.ours:
            self.watchdog.resumed()
            return
        self._resuming = True
        try:
            await self.guest.resume()
        finally:
            self._resuming = False
        self.ours = False
        self.watchdog.resumed()

    async def follow_events(self) -> None:
        """Follow the monitor's ``RESUME`` events until cancelled (nothing
        when the guest's monitor has no QMP events, e.g. libvirt)."""
        import logging

        listen = getattr(getattr(self.guest, "monitor", None), "listen", None)
        if listen is None:
            return
        with listen("RESUME") as listener:
            self._listener = listener
            async for _event in listener:
                if self.ours and not self._resuming:
                    self.ours = False
                    self.watchdog.resumed()
                    logging.getLogger(__name__).info(
                        "--freeze: the guest was resumed by someone else; its pause is no longer ours")

    def close(self) -> None:
        """Stop following events and let the watchdog go (call after the
        last resume: a pause still ours is then the watchdog's to undo)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.watchdog.close()


def watch_freeze(core: Any, monitor: object, quiet: bool = True) -> WatchedGuest | None:
    """Put the guest of live core ``core`` (a :class:`vmcorefs.live.LiveCore`
    under ``--freeze``) under a new watchdog (``quiet``: see :func:`watch`)
    and follow ``monitor``'s events from the running event loop; None
    (logged) when the guest's kind has no resume action or the watchdog
    cannot be spawned.  Close it with :meth:`WatchedGuest.close`."""
    import asyncio
    import logging

    log = logging.getLogger(__name__)
    action = action_for(monitor)
    if action is None:
        log.warning("--freeze: no watchdog for this kind of guest; it stays paused if vmcorefs is killed")
        return None
    try:
        watchdog = start(action, quiet)
    except OSError as e:
        log.warning("--freeze: cannot start the watchdog (%s); the guest stays paused if vmcorefs is killed", e)
        return None
    watched = WatchedGuest(core.guest, watchdog)
    core.guest = watched
    watched._task = asyncio.get_running_loop().create_task(watched.follow_events())
    return watched


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
