r"""The native read path: FUSE_READ answered in C, everything else by pyfuse3.

Part of the FUSE adapter.  After ``pyfuse3.init()`` has mounted, :meth:`NativeReads.attach`
puts :mod:`vmcorefs._readpath` between the kernel and pyfuse3::

    kernel --/dev/fuse--> Engine (C threads) --SOCK_SEQPACKET--> pyfuse3 (libfuse)
                            \\-- FUSE_READ of a registered handle: replied here

pyfuse3's descriptor number is re-pointed (``dup2``) at one end of a
``SOCK_SEQPACKET`` pair, which keeps the device's one-message-per-request
framing; the engine keeps the real ``/dev/fuse`` descriptor.  Each
``open()`` registers its handle's layout -- a
:class:`~vmcorefs.core.layout.SparseFile` whose segments are resolved
:class:`~vmcorefs.core.layout.Extent` records (``SHARED`` or ``PROCMEM``,
see :meth:`vmcorefs.qemu.guest.Snapshot.resolve`) -- and ``release()``
forgets it.  Shared-file RAM is spliced (one copy, by the
kernel, into the reader's pages); ``/proc/PID/mem`` is ``pread`` and written
(two copies), with unreadable pages as zeros, as in
:func:`vmcorefs.qemu.memory.read_into`.

The engine reports on a pipe: ``U`` when the kernel ended the connection
(unmount), ``G`` when a read found QEMU gone, ``R`` / ``I`` when libfuse
accepted / refused the kernel's ``FUSE_INIT`` (after a refusal libfuse
ends its session by itself).
"""

from __future__ import annotations

import logging
import os
import socket
from types import ModuleType
from typing import Any, Callable

from vmcorefs.core.layout import SparseFile
from vmcorefs.errors import MountError

log = logging.getLogger(__name__)

_readpath: ModuleType | None
IMPORT_ERROR: str | None = None
try:
    import vmcorefs._readpath as _readpath
except ImportError as _e:  # built by `pip install` (setup.py); absent in a bare source tree
    _readpath = None
    IMPORT_ERROR = str(_e)

#: Socket buffer for the pyfuse3 side: its largest message is one read reply.
SOCKET_BUFFER = 4 << 20


def available() -> bool:
    return _readpath is not None


def _fuse_device_fds() -> list[int]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    return found


class NativeReads:
    """The engine attached to this process's one pyfuse3 session."""

    def __init__(self, engine: Any, events: int, on_event: Callable[[str], None]) -> None:
        self.engine = engine
        self.events = events
        self.on_event = on_event
        self._fds: tuple[int, ...] = ()

    @classmethod
    def attach(cls, pid: int | None, on_event: Callable[[str], None]) -> "NativeReads":
        """Take over the FUSE device of the mounted pyfuse3 session."""
        if _readpath is None:
            raise MountError(f"the native read path is not built ({IMPORT_ERROR}); reinstall vmcorefs"
                                " with a C compiler, or mount with --reads python")
        fds = _fuse_device_fds()
        if len(fds) != 1:
            raise MountError(f"expected one /dev/fuse descriptor after mounting, found {len(fds)}")
        session_fd = fds[0]
        dev = os.dup(session_fd)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # SO_*BUFFORCE
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        os.dup2(theirs.fileno(), session_fd, inheritable=False)
        theirs.close()
        ev_r, ev_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(ev_r, False)
        app = ours.detach()
        try:
            engine = _readpath.Engine(dev, app, ev_w, pid or 0)
            engine.start()
        except BaseException:
            for fd in (ev_r, ev_w, app, dev):
                os.close(fd)
            raise
        self = cls(engine, ev_r, on_event)
        self._fds = (dev, app, ev_w)
        return self

    def poll_events(self) -> None:
        """Read the engine's reports (call when ``events`` is readable)."""
        try:
            data = os.read(self.events, 64)
        except BlockingIOError:
            return
        for code in data.decode(errors="replace"):
            self.on_event(code)

    def register(self, fh: int, file: SparseFile, pid: int | None = None) -> None:
        """Serve FUSE_READ of handle ``fh`` from ``file`` (resolved: its
        segments are ``SHARED``/``PROCMEM`` extents).  ``pid`` is the QEMU
        process of its ``PROCMEM`` extents (None: the one given to
        :meth:`attach`; ``mount --all`` attaches none and names each
        handle's).  Raises ``ValueError`` for a layout the engine refuses,
        ``MemoryError``."""
        self.engine.register(fh, file.size, file.prefix, file.segments, pid or 0)

    def unregister(self, fh: int) -> None:
        self.engine.unregister(fh)

    def set_gone(self) -> None:
        self.engine.set_gone()

    def stats(self) -> dict[str, int]:
        return dict(self.engine.stats())

    def stop(self) -> None:
        """Stop the threads and close the device (call after pyfuse3.close)."""
        self.engine.stop()
        log.info("native read path: %s", self.stats())
        for fd in (*self._fds, self.events):
            try:
                os.close(fd)
            except OSError:
                pass
