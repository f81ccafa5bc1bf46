"""The live core of one VM, without FUSE: its files, handles and rules.

A :class:`LiveCore` is what ``MNT/vmcore`` and its siblings are, for any
front end (the FUSE adapter in :mod:`vmcorefs.fs`, a dump writer, a test):

* **one registry of files**, :data:`FILES`, in the spirit of Linux's
  ``kclist_add`` (fs/proc/kcore.c): each :class:`FileSpec` says its name,
  how it is built from a :class:`~vmcorefs.qemu.guest.Snapshot`, whether
  opening it pauses the guest under ``--freeze`` and whether it holds guest
  memory.  Adding a file is adding an entry.
* **sizes eagerly, bytes lazily**: listings and attributes come from the
  latest layout (recomputed when older than ``attr_ttl`` seconds, the
  previous one served while a refresh runs or fails); every :meth:`open`
  takes a fresh snapshot that its :class:`Handle` keeps until
  :meth:`release`, so a layout change (hotplug) is never seen under an open
  handle; :meth:`read` resolves bytes at read time.
* **--freeze**: the first open of a guest-memory file pauses the guest (only
  if it was running), the last release resumes it; an open that fails or is
  cancelled gives its share back.
* **the page cache** (``cache=True``): a handle may read through the
  kernel's page cache only while no other cached handle of the same file
  shows another layout (the cache belongs to the file, not the handle);
  :meth:`release` says when the file's cached pages must be dropped; the
  file's ``mtime`` moves so that cached pages are never older than
  ``max_age`` seconds (never under ``--freeze``).
* **QEMU gone**: once QEMU exits (a read or open finds it gone, or the front
  end learns it from a pidfd) every open and read raises
  :class:`~vmcorefs.errors.QEMUGoneError`, and ``on_gone`` is called once.

The guest is anything with the :class:`GuestControl` methods
(:class:`vmcorefs.qemu.guest.Guest` for a QMP socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from vmcorefs.core.kcore import gdb_program, gdb_script
from vmcorefs.core.layout import ExtentKind, SparseFile
from vmcorefs.errors import NoSuchFileError, QEMUGoneError, QMPError, QMPTimeoutError, VmcorefsError
from vmcorefs.qemu.guest import Snapshot
from vmcorefs.qemu.memory import read_extent, zero_fill

log = logging.getLogger(__name__)

#: Seconds a layout serves listings and attributes before it is recomputed.
ATTR_TTL = 1.0
#: Seconds listings and attributes serve the previous layout, without asking
#: QEMU again, after a refresh failed (a hung QEMU would make each ``stat``
#: wait the whole QMP timeout); an open always asks.
REFRESH_BACKOFF = 30.0
#: Default bound (seconds) on how old cached guest memory may be.
MAX_AGE = 1.0
#: Size of the reply buffer of the Python read path (grown on demand).
READ_BUFFER = 1 << 20


class GuestControl(Protocol):
    """What a live core needs of a guest (see :class:`vmcorefs.qemu.guest.Guest`)."""

    async def snapshot(self) -> Snapshot:
        """A fresh layout.  Raises QMPError (QEMUGoneError when QEMU exited)."""
        ...

    async def status(self) -> str:
        """``running``, ``paused``, ...  Raises QMPError."""
        ...

    async def pause(self) -> None:
        """Stop the vCPUs.  Raises QMPError."""
        ...

    async def resume(self) -> None:
        """Start the vCPUs.  Raises QMPError."""
        ...


def _vmcoreinfo(snap: Snapshot, directory: str) -> SparseFile:
    if snap.vmcoreinfo is None:
        raise NoSuchFileError("the guest published no VMCOREINFO", "vmcoreinfo")
    return SparseFile.text(snap.vmcoreinfo)


def _gdbinit(snap: Snapshot, directory: str) -> SparseFile:
    if snap.kernel_offset is None:
        raise NoSuchFileError("no KASLR offset (no VMCOREINFO)", "gdbinit")
    return SparseFile.text(gdb_script(os.path.join(directory, "kcore"), snap.kernel_offset,
                                      gdb_program(snap.dump.e_machine)))


def _kcore(snap: Snapshot, directory: str) -> SparseFile:
    try:
        return snap.kcore()
    except Exception as e:  # FormatError (no page-table root) or a walk that failed
        raise NoSuchFileError(str(e), "kcore") from None


@dataclass(frozen=True)
class FileSpec:
    """One file of a live core (an entry of :data:`FILES`)."""

    name: str
    #: ``build(snapshot, directory)`` -> the file's layout; raises
    #: :class:`NoSuchFileError` when this guest has no such file now.
    build: Callable[[Snapshot, str], SparseFile] = field(repr=False)
    #: Holds guest memory: opening it pauses the guest under ``--freeze``,
    #: and its cached pages are dropped when QEMU goes away.
    guest_memory: bool
    #: One line for ``--help`` style listings.
    doc: str


#: The files of a live core, in listing order.
FILES: tuple[FileSpec, ...] = (
    FileSpec("vmcore", lambda snap, _: snap.vmcore, True, "live ELF core (what dump-guest-memory writes)"),
    FileSpec("pmem", lambda snap, _: snap.pmem, True, "raw guest-physical memory, holes as zeros"),
    FileSpec("vmcoreinfo", _vmcoreinfo, False, "the guest kernel's VMCOREINFO"),
    FileSpec("kcore", _kcore, True, "kernel-virtual live core, like /proc/kcore"),
    FileSpec("gdbinit", _gdbinit, False, "gdb: vmlinux with the KASLR offset + kcore"),
)
BY_NAME = {spec.name: spec for spec in FILES}


@dataclass(eq=False)
class Handle:
    """An open file: its layout, bound to the snapshot taken at :meth:`LiveCore.open`."""

    core: "LiveCore" = field(repr=False)
    spec: FileSpec
    snap: Snapshot
    #: The layout (guest-physical segments), compared between handles.
    layout: SparseFile
    #: The same, resolved to where bytes are read (what reads and the native engine use).
    file: SparseFile
    #: This handle holds a share of the ``--freeze`` pause.
    frozen: bool
    #: Reads bypass the page cache.
    direct: bool


@dataclass(frozen=True)
class Attributes:
    """What ``stat`` says of a file: ``size`` bytes, ``mtime_ns`` (ns since the epoch)."""

    size: int
    mtime_ns: int


class LiveCore:
    """The live core of one VM: see the module docstring.

    ``directory`` is where the files appear (``gdbinit`` names ``kcore``
    there).  ``clock`` (monotonic seconds) and ``wall_ns`` (epoch ns) are
    injectable for tests.
    """

    def __init__(self, guest: GuestControl, directory: str, *, freeze: bool = False, cache: bool = True,
                 max_age: float = MAX_AGE, attr_ttl: float = ATTR_TTL, name: str = "",
                 clock: Callable[[], float] = time.monotonic, wall_ns: Callable[[], int] = time.time_ns) -> None:
        #: The VM's name in a :class:`LiveDirectory` ("" for a lone core).
        self.name = name
        self.guest = guest
        self.directory = directory
        self.freeze = freeze
        self.cache = cache
        self.max_age = max_age
        self.attr_ttl = attr_ttl
        self.clock = clock
        self.wall_ns = wall_ns
        self.created_ns = wall_ns()
        #: Why QEMU is gone (None while it runs).
        self.gone_reason: str | None = None
        #: Called once when QEMU is found gone (the front end stops serving).
        self.on_gone: Callable[[LiveCore], None] | None = None
        self.handles: set[Handle] = set()
        self._snap: Snapshot | None = None
        self._snap_lock = asyncio.Lock()
        #: When the last refresh failed (None: it succeeded): see REFRESH_BACKOFF.
        self._refresh_failed: float | None = None
        self._freeze_lock = asyncio.Lock()
        self._freeze_count = 0
        self._paused_by_us = False
        self._buf = memoryview(bytearray(READ_BUFFER))

    # -- QEMU gone -----------------------------------------------------------
    def guest_gone(self, reason: str) -> None:
        """QEMU exited: every open and read fails from now on; ``on_gone`` once."""
        if self.gone_reason is None:
            self.gone_reason = reason
            log.info("QEMU is gone (%s)", reason)
            if self.on_gone is not None:
                self.on_gone(self)

    def check_alive(self) -> None:
        """Raise :class:`QEMUGoneError` once QEMU is gone."""
        if self.gone_reason is not None:
            raise QEMUGoneError(self.gone_reason)

    # -- layouts -------------------------------------------------------------
    def set_initial(self, snap: Snapshot) -> None:
        """Serve ``snap`` as the latest layout (the one taken before mounting)."""
        self._snap = snap

    async def current(self, max_age: float | None = None, stale_ok: bool = True) -> Snapshot:
        """The latest layout, recomputed unless younger than ``max_age``
        seconds (default ``attr_ttl``; 0: always a fresh one).

        With ``stale_ok`` (listings, attributes) a refresh that is already
        running or fails with a QMP error other than QEMU gone yields the
        previous layout; :meth:`open` passes ``stale_ok=False``.  Raises
        :class:`QMPError` (:class:`QEMUGoneError` once QEMU is gone).
        """
        self.check_alive()
        max_age = self.attr_ttl if max_age is None else max_age
        snap = self._snap
        backing_off = self._refresh_failed is not None and self.clock() - self._refresh_failed < REFRESH_BACKOFF
        if snap is not None and stale_ok and (self.clock() - snap.taken < max_age or self._snap_lock.locked()
                                              or backing_off):
            return snap
        async with self._snap_lock:
            snap = self._snap
            if snap is not None and self.clock() - snap.taken < max_age:
                return snap
            try:
                self._snap = await self.guest.snapshot()
            except QEMUGoneError as e:
                self.guest_gone(str(e))
                raise
            except QMPError as e:
                self._refresh_failed = self.clock()
                if not stale_ok or snap is None:
                    raise
                log.info("layout refresh failed, serving the previous one: %s", e)
                return snap
            self._refresh_failed = None
            return self._snap

    def listed(self, snap: Snapshot) -> list[tuple[FileSpec, SparseFile]]:
        """The files this guest has in ``snap``, in :data:`FILES` order."""
        out = []
        for spec in FILES:
            try:
                out.append((spec, spec.build(snap, self.directory)))
            except NoSuchFileError:
                continue
        return out

    async def listing(self) -> list[tuple[str, Attributes]]:
        """The files of the latest layout (:meth:`current`) with their
        :meth:`stat`, in :data:`FILES` order: what a directory lists.
        Raises :class:`QMPError` as :meth:`current`."""
        snap = await self.current()
        return [(spec.name, self.stat(spec.name, snap)) for spec, _file in self.listed(snap)]

    def file(self, name: str, snap: Snapshot) -> SparseFile:
        """The layout of file ``name`` in ``snap``; :class:`NoSuchFileError` if absent."""
        spec = BY_NAME.get(name)
        if spec is None:
            raise NoSuchFileError("no such file", name)
        return spec.build(snap, self.directory)

    @property
    def attr_timeout(self) -> float:
        """Seconds a front end may cache attributes: ``max_age`` when reads are
        cached (the kernel then re-asks and a new mtime drops stale pages), else 0."""
        return self.max_age if self.cache else 0.0

    def attributes(self, file: SparseFile, snap: Snapshot) -> Attributes:
        """``stat`` of ``file`` (of ``snap``).  The mtime says how fresh the
        bytes are: the snapshot's time with ``--direct``, "now" for cached
        reads (so that pages older than ``max_age`` are dropped), the mount's
        time under ``--freeze`` (the guest cannot change while a file is open)."""
        if not self.cache:
            mtime = self.wall_ns() - int((self.clock() - snap.taken) * 1e9)
        elif not self.freeze:
            mtime = self.wall_ns()
        else:
            mtime = self.created_ns
        return Attributes(file.size, mtime)

    def stat(self, name: str, snap: Snapshot) -> Attributes:
        """``stat`` of file ``name``: :meth:`attributes` of its layout in
        ``snap``, but never smaller than a layout still open.  The kernel
        cuts every read of the file at the size it last saw, for all its
        handles: a file that shrank since a handle was opened (kcore as the
        guest's page tables change) or vanished (kcore and vmcoreinfo while
        the guest reboots) must not cut reads of that handle short or fail
        them.  Raises :class:`NoSuchFileError` when ``snap`` has no such
        file and none is open."""
        held = [h.layout.size for h in self.handles if h.spec.name == name]
        try:
            file = self.file(name, snap)
        except NoSuchFileError:
            if not held:
                raise
            file = SparseFile.text("")
        at = self.attributes(file, snap)
        return Attributes(max([at.size, *held]), at.mtime_ns)

    async def stat_now(self, name: str) -> Attributes:
        """:meth:`stat` of file ``name`` in the latest layout (:meth:`current`).
        Raises :class:`NoSuchFileError`, :class:`QMPError`."""
        return self.stat(name, await self.current())

    @property
    def cache_policy(self) -> str:
        """How reads are cached, for the read path's counters:
        ``direct`` or ``max-age N s``."""
        return f"max-age {self.max_age:g} s" if self.cache else "direct"

    def cached_memory_files(self) -> list[str]:
        """The files whose page cache may hold guest memory (a front end
        drops it when QEMU goes away): none with ``cache=False``."""
        return [spec.name for spec in FILES if spec.guest_memory] if self.cache else []

    # -- handles ---------------------------------------------------------------
    async def open(self, name: str) -> Handle:
        """Open file ``name`` on a fresh snapshot.

        Raises :class:`NoSuchFileError`, :class:`QMPError` (timeout, QEMU
        gone), :class:`~vmcorefs.errors.AccessError`,
        :class:`~vmcorefs.errors.FormatError`; on any failure or
        cancellation the ``--freeze`` share taken here is given back.
        """
        spec = BY_NAME.get(name)
        if spec is None:
            raise NoSuchFileError("no such file", name)
        self.check_alive()
        frozen = self.freeze and spec.guest_memory
        if frozen:
            await self._freeze_acquire()
        try:
            snap = await self.current(max_age=0.0, stale_ok=False)
            layout = spec.build(snap, self.directory)
            resolved = snap.resolve(layout)
        except BaseException:
            if frozen:
                await asyncio.shield(self._freeze_release())
            raise
        direct = not self.cache or any(
            o.spec is spec and not o.direct and o.layout != layout for o in self.handles)
        if direct and self.cache:
            log.info("open %s: another layout is open and cached; this handle reads directly", name)
        handle = Handle(self, spec, snap, layout, resolved, frozen, direct)
        self.handles.add(handle)
        return handle

    def read(self, handle: Handle, offset: int, size: int) -> memoryview:
        """Up to ``size`` bytes of ``handle``'s file at ``offset`` (fewer at EOF).

        The returned view is valid until the next call (one reused buffer:
        a reply is sent before another read runs).  Raises
        :class:`QEMUGoneError`.
        """
        self.check_alive()
        file = handle.file
        length = max(0, min(size, file.size - offset))
        if length > len(self._buf):
            self._buf = memoryview(bytearray(length))
        out = self._buf[:length]
        try:
            for ext in file.extents(offset, length):
                piece = out[ext.offset - offset:ext.offset - offset + ext.length]
                if ext.kind == ExtentKind.PREFIX:
                    piece[:] = file.prefix[ext.src:ext.src + ext.length]
                elif ext.kind == ExtentKind.ZERO:
                    zero_fill(piece)
                else:
                    read_extent(ext, piece, handle.snap.alive)
        except QEMUGoneError as e:
            self.guest_gone(str(e))
            raise
        self.check_alive()
        return out

    async def release(self, handle: Handle) -> bool:
        """Close ``handle``; True when the file's page cache must now be
        dropped (it was read cached and no cached handle of it remains).
        Resumes the guest at the last ``--freeze`` release.  Raises
        :class:`QMPError` when the resume fails."""
        if handle not in self.handles:
            return False
        self.handles.discard(handle)
        drop = not handle.direct and not any(o.spec is handle.spec and not o.direct for o in self.handles)
        if handle.frozen:
            await self._freeze_release()
        return drop

    # -- --freeze ----------------------------------------------------------------
    async def _freeze_acquire(self) -> None:
        async with self._freeze_lock:
            if self._freeze_count == 0:
                # Not while a snapshot is taken: QEMU's dump stops the guest
                # for its duration and restarts it after, so a status read
                # then says "paused" and the guest would run under the freeze.
                async with self._snap_lock:
                    if await self.guest.status() == "running":
                        try:
                            await self.guest.pause()
                        except (QMPTimeoutError, asyncio.CancelledError):
                            # The stop was sent: QEMU may have done it (a
                            # signal cancelled us as it answered) or do it
                            # later.  Undo it now; a cont of a running guest
                            # does nothing.
                            self._paused_by_us = True
                            with contextlib.suppress(VmcorefsError):
                                await asyncio.shield(self.thaw())
                            raise
                        self._paused_by_us = True
                        log.info("guest paused (--freeze)")
            self._freeze_count += 1

    async def _freeze_release(self) -> None:
        async with self._freeze_lock:
            self._freeze_count -= 1
            if self._freeze_count == 0:
                await self.thaw()

    @property
    def paused_by_us(self) -> bool:
        """True while ``--freeze`` holds the guest paused."""
        return self._paused_by_us

    async def thaw(self) -> None:
        """Resume the guest if this live core paused it (and QEMU still runs)."""
        if self._paused_by_us:
            self._paused_by_us = False
            if self.gone_reason is None:
                await self.guest.resume()
                log.info("guest resumed (--freeze)")


class LiveDirectory:
    """Many VMs in one tree: one :class:`LiveCore` per name (``MNT/NAME/vmcore``).

    Who is in it is the caller's business (e.g. libvirt's lifecycle events);
    creating a core touches no guest, so listing the directory costs nothing
    per VM.  A core that is removed is marked gone (its open handles read
    EIO) and ``on_remove`` is called with it.
    """

    def __init__(self) -> None:
        self.cores: dict[str, LiveCore] = {}
        self.on_remove: Callable[[LiveCore], None] | None = None

    def add(self, core: LiveCore) -> None:
        """Put ``core`` in as ``core.name`` (replacing, and removing, an older one)."""
        old = self.cores.get(core.name)
        if old is not None and old is not core:
            self.remove(core.name, "replaced by a new VM of the same name")
        self.cores[core.name] = core

    def holds(self, core: LiveCore) -> bool:
        """Whether ``core`` is still in (not removed or replaced)."""
        return self.cores.get(core.name) is core

    def remove(self, name: str, reason: str) -> LiveCore | None:
        """Take the VM ``name`` out: its core is gone for ``reason``."""
        core = self.cores.pop(name, None)
        if core is not None:
            core.guest_gone(reason)
            if self.on_remove is not None:
                self.on_remove(core)
        return core
