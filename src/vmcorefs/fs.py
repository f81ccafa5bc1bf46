"""The FUSE adapter (pyfuse3, asyncio mode): requests in, errno out.

Files (all read-only, mode 0400 unless ``--mode``, owned by the mounting user)::

    vmcore       live ELF core (:func:`vmcorefs.core.elf.build_vmcore`)
    pmem         raw guest-physical memory, holes as zeros
    vmcoreinfo   the guest's VMCOREINFO text (listed only when known)
    kcore        kernel-virtual ELF core, like /proc/kcore (needs VMCOREINFO)
    gdbinit      gdb commands that load vmlinux with the KASLR offset and kcore

Semantics follow Linux ``/proc/kcore`` where a live core can: sizes come
from the latest layout (refreshed when older than ``ATTR_TTL``), every
``open()`` takes a fresh :class:`~vmcorefs.qemu.guest.Snapshot` that its
handle keeps until release, and with ``--freeze`` the guest is paused while
any handle on ``vmcore``, ``pmem`` or ``kcore`` is open.

Reads (two modes):

* cached (the default): through the kernel's page cache, so tools that read
  a few bytes at a time (drgn's kallsyms loader: ~350,000 reads) cost one
  FUSE request per readahead window instead of one per read.  The cache
  starts empty at each ``open()`` (``keep_cache`` off) and is never older
  than ``max_age`` seconds: attributes expire after ``max_age`` and carry a
  new ``st_mtime`` each time, and the kernel (``FUSE_AUTO_INVAL_DATA``,
  which libfuse enables) drops the file's cached pages when a read finds
  the mtime changed.  Under ``--freeze`` the mtime stays put (the guest
  cannot change while the file is open).  At the last close the cached
  pages are dropped, so guest memory does not linger in the host's cache.
  The cache is the inode's, shared by its handles, so only handles with the
  same layout share it: an ``open()`` while cached handles of another layout
  are open (a running guest's registers change from one open to the next;
  a DIMM may have been plugged) reads directly instead.
* direct (``--direct``): ``direct_io``, every read goes to guest memory
  (reading twice shows the guest changing), at one FUSE request per read.

FUSE_READ itself is answered by the native engine of
:mod:`vmcorefs.readpath` when it is attached (each open registers its
layout there); :meth:`VmcoreFS.read` serves reads otherwise.  The root's
extended attribute ``user.vmcorefs.stats`` holds the read path's counters
(JSON: requests served, spliced or copied, bytes).  Errors become
errno values in one place, :func:`_errno_of`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Concatenate, Coroutine, ParamSpec, TypeVar, cast

import pyfuse3

from vmcorefs.core.kcore import gdb_script
from vmcorefs.core.layout import ExtentKind, SparseFile
from vmcorefs.errors import (
    AccessError,
    FormatError,
    QEMUGoneError,
    QMPError,
    QMPTimeoutError,
    VmcorefsError,
)
from vmcorefs.qemu.guest import Guest, Snapshot
from vmcorefs.qemu.memory import read_extent, zero_fill

if TYPE_CHECKING:
    from vmcorefs.readpath import NativeReads

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
VMCORE, PMEM, VMCOREINFO, KCORE, GDBINIT = ROOT + 1, ROOT + 2, ROOT + 3, ROOT + 4, ROOT + 5
NAMES = {VMCORE: b"vmcore", PMEM: b"pmem", VMCOREINFO: b"vmcoreinfo", KCORE: b"kcore", GDBINIT: b"gdbinit"}
#: Opening these pauses the guest under --freeze.
MEMORY_FILES = (VMCORE, PMEM, KCORE)
BY_NAME = {v: k for k, v in NAMES.items()}
#: Seconds a layout serves getattr/lookup before it is recomputed.
ATTR_TTL = 1.0
#: Default bound (seconds) on how old cached guest memory may be.
MAX_AGE = 1.0
BLKSIZE = 1 << 20
#: Extended attribute of the root directory with the read path's counters.
STATS_XATTR = b"user.vmcorefs.stats"
#: Seconds requests fail with EIO after QEMU exits, before the unmount.
GONE_GRACE = 0.3

T = TypeVar("T")
P = ParamSpec("P")


def _text_file(text: str) -> SparseFile:
    data = text.encode()
    return SparseFile(data, (), len(data))


def _drop_cache(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(pyfuse3.InodeT(inode))
    except OSError as e:
        log.info("could not drop the page cache of inode %d: %s", inode, e)


def _errno_of(exc: BaseException) -> int:
    """The one mapping from vmcorefs errors to errno."""
    if isinstance(exc, QMPTimeoutError):
        return errno.ETIMEDOUT
    if isinstance(exc, AccessError):
        return errno.EACCES
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def _fuse_op(
    fn: Callable[Concatenate["VmcoreFS", P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate["VmcoreFS", P], Coroutine[Any, Any, T]]:
    """Run a FUSE handler, turning any failure into a FUSEError."""

    name = fn.__name__

    async def wrapper(self: "VmcoreFS", /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self.on_first_request is not None:
            hook, self.on_first_request = self.on_first_request, None
            hook()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r", name, tuple(a for a in args if not isinstance(a, pyfuse3.RequestContext)))
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except VmcorefsError as e:
            if isinstance(e, QEMUGoneError):
                self.guest_gone(str(e))
            log.info("%s: %s", name, e)
            raise pyfuse3.FUSEError(_errno_of(e)) from None
        except Exception as e:  # a bug: keep serving, say where
            log.error("%s failed", name, exc_info=True)
            raise pyfuse3.FUSEError(_errno_of(e)) from None

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = fn.__doc__
    return wrapper


@dataclass
class Handle:
    inode: int
    file: SparseFile
    snap: Snapshot
    frozen: bool
    direct: bool
    resolved: SparseFile


class VmcoreFS(pyfuse3.Operations):
    """The mounted directory of one guest."""

    enable_writeback_cache = False

    def __init__(self, guest: Guest, freeze: bool = False, file_mode: int = 0o400,
                 mountpoint: str = ".", cache: bool = True, max_age: float = MAX_AGE) -> None:
        super().__init__()
        self.guest = guest
        self.mountpoint = mountpoint
        self.freeze = freeze
        self.cache = cache
        self.max_age = max_age
        #: The native read path, when attached (see vmcorefs.readpath).
        self.native: NativeReads | None = None
        #: Called once, at the first request after FUSE_INIT.
        self.on_first_request: Callable[[], None] | None = None
        #: Permission bits of the files; the directory gets r-x where they have r.
        self.file_mode = file_mode & 0o444
        self.dir_mode = 0o500 | self.file_mode | (self.file_mode >> 2)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mounted_at = time.time()
        self.gone_reason: str | None = None
        self._snap: Snapshot | None = None
        self._snap_lock = asyncio.Lock()
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._freeze_lock = asyncio.Lock()
        self._freeze_count = 0
        self._paused_by_us = False
        self._buf = memoryview(bytearray(BLKSIZE))

    # -- state ------------------------------------------------------------
    def guest_gone(self, reason: str) -> None:
        """QEMU exited: fail every request from now on and stop serving."""
        if self.gone_reason is None:
            self.gone_reason = reason
            log.info("QEMU is gone (%s): unmounting", reason)
            if self.native is not None:
                self.native.set_gone()
            loop = asyncio.get_running_loop()
            if self.cache:  # cached pages would still answer: drop them so reads fail
                for inode in MEMORY_FILES:
                    loop.run_in_executor(None, _drop_cache, inode)
            # Readers in flight get EIO (not ECONNABORTED) for a moment, then unmount.
            loop.call_later(GONE_GRACE, pyfuse3.terminate)

    def _check_alive(self) -> None:
        if self.gone_reason is not None:
            raise QEMUGoneError(self.gone_reason)

    async def current(self, max_age: float = ATTR_TTL, stale_ok: bool = True) -> Snapshot:
        """The latest layout, recomputed when older than ``max_age`` seconds.

        With ``stale_ok`` (attributes, listings) a refresh that is already
        running or fails (QEMU stopped, monitor timeout) yields the previous
        layout instead of an error; ``open()`` passes ``stale_ok=False``.
        """
        self._check_alive()
        snap = self._snap
        if snap is not None and stale_ok:
            if time.monotonic() - snap.taken <= max_age or self._snap_lock.locked():
                return snap
        async with self._snap_lock:
            snap = self._snap
            if snap is not None and time.monotonic() - snap.taken <= max_age:
                return snap
            try:
                self._snap = await self.guest.snapshot()
            except QMPError as e:
                if not stale_ok or snap is None or isinstance(e, QEMUGoneError):
                    raise
                log.info("layout refresh failed, serving the previous one: %s", e)
                return snap
            return self._snap

    def set_initial(self, snap: Snapshot) -> None:
        self._snap = snap

    def _file(self, inode: int, snap: Snapshot) -> SparseFile:
        if inode == VMCORE:
            return snap.vmcore
        if inode == PMEM:
            return snap.pmem
        if inode == VMCOREINFO and snap.vmcoreinfo is not None:
            return _text_file(snap.vmcoreinfo)
        if inode == KCORE:
            try:
                return snap.kcore()
            except FormatError:
                pass
        if inode == GDBINIT and snap.kernel_offset is not None:
            return _text_file(gdb_script(os.path.join(self.mountpoint, "kcore"), snap.kernel_offset))
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _listed(self, snap: Snapshot) -> list[int]:
        inodes = [VMCORE, PMEM]
        if snap.vmcoreinfo is not None:
            inodes.append(VMCOREINFO)
        try:
            snap.kcore()
            inodes.append(KCORE)
        except FormatError:
            pass
        if snap.kernel_offset is not None:
            inodes.append(GDBINIT)
        return inodes

    def _attr(self, inode: int, snap: Snapshot | None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = 0
        # Cached reads: the kernel re-asks after max_age, and a new mtime then
        # makes it drop its cached pages (FUSE_AUTO_INVAL_DATA).
        a.attr_timeout = self.max_age if self.cache else 0
        a.st_uid, a.st_gid = self.uid, self.gid
        ns = int(self.mounted_at * 1e9)
        a.st_atime_ns = a.st_ctime_ns = a.st_mtime_ns = ns
        a.st_blksize = BLKSIZE
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | self.dir_mode
            a.st_nlink = 2
        else:
            assert snap is not None
            a.st_mode = stat.S_IFREG | self.file_mode
            a.st_nlink = 1
            a.st_size = self._file(inode, snap).size
            if not self.cache:
                a.st_mtime_ns = int((time.time() - (time.monotonic() - snap.taken)) * 1e9)
            elif not self.freeze:
                a.st_mtime_ns = time.time_ns()
        a.st_blocks = (a.st_size + 511) // 512
        return a

    # -- freeze -----------------------------------------------------------
    async def _freeze_acquire(self) -> None:
        async with self._freeze_lock:
            if self._freeze_count == 0 and await self.guest.status() == "running":
                await self.guest.monitor.execute("stop")
                self._paused_by_us = True
                log.info("guest paused (--freeze)")
            self._freeze_count += 1

    async def _freeze_release(self) -> None:
        async with self._freeze_lock:
            self._freeze_count -= 1
            if self._freeze_count == 0:
                await self.thaw()

    async def thaw(self) -> None:
        """Resume the guest if vmcorefs paused it."""
        if self._paused_by_us:
            self._paused_by_us = False
            if self.gone_reason is None:
                await self.guest.monitor.execute("cont")
                log.info("guest resumed (--freeze)")

    # -- FUSE operations --------------------------------------------------
    @_fuse_op
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(ROOT, None)
        inode = BY_NAME.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode, await self.current())

    @_fuse_op
    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._attr(ROOT, None)
        if inode not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode, await self.current())

    @_fuse_op
    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(ROOT)

    @_fuse_op
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        snap = await self.current()
        for inode in self._listed(snap):
            if inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, NAMES[inode], self._attr(inode, snap), inode):
                break

    @_fuse_op
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_fuse_op
    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        self._check_alive()
        frozen = self.freeze and inode in MEMORY_FILES
        if frozen:
            await self._freeze_acquire()
        try:
            snap = await self.current(max_age=0.0, stale_ok=False)
            file = self._file(inode, snap)
        except BaseException:
            if frozen:
                await self._freeze_release()
            raise
        # The page cache belongs to the inode, not the handle: a cached handle
        # must not see bytes of another layout (another moment's notes, or a
        # hotplug).  While cached handles with a different layout are open,
        # this one reads directly.
        direct = not self.cache or any(
            o.inode == inode and not o.direct and o.file != file for o in self._handles.values())
        if direct and self.cache:
            log.info("open %s: another layout is open and cached; this handle reads directly",
                     NAMES[inode].decode())
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(inode, file, snap, frozen, direct, snap.resolve(file))
        if self.native is not None:
            try:
                self.native.register(fh, snap.resolve(file))
            except (ValueError, MemoryError) as e:  # served by read() below instead
                log.warning("native read path refused %s: %s", NAMES[inode].decode(), e)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=direct, keep_cache=False)

    @_fuse_op
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        # The reply buffer is reused: pyfuse3 sends it before any other
        # handler can run (this coroutine never awaits), so no request ever
        # sees another's bytes, and no request pays for a fresh allocation.
        self._check_alive()
        h = self._handles[fh]
        file = h.file
        length = max(0, min(size, file.size - off))
        if length > len(self._buf):
            self._buf = memoryview(bytearray(length))
        out = self._buf[:length]
        for ext in h.resolved.extents(off, length):
            start = ext.offset - off
            piece = out[start:start + ext.length]
            if ext.kind >= ExtentKind.SHARED:
                read_extent(ext, piece, h.snap.alive)
            elif ext.kind == ExtentKind.PREFIX:
                piece[:] = file.prefix[ext.src:ext.src + ext.length]
            else:
                zero_fill(piece)
        self._check_alive()
        return cast(bytes, out)  # pyfuse3 replies from any contiguous buffer

    @_fuse_op
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        if self.native is not None:
            self.native.unregister(fh)
        if self.cache and not any(o.inode == h.inode and not o.direct for o in self._handles.values()):
            # In a thread: invalidation waits for pages under read, whose
            # replies this event loop must stay free to send.
            await asyncio.get_running_loop().run_in_executor(None, _drop_cache, h.inode)
        if h.frozen:
            await self._freeze_release()

    @_fuse_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLKSIZE
        s.f_namemax = 255
        return s

    @_fuse_op
    async def getxattr(self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """``user.vmcorefs.stats`` on the mount's root: the read path's counters (JSON)."""
        if inode == ROOT and name == STATS_XATTR:
            stats: dict[str, object] = {"reads": "native" if self.native is not None else "python",
                                        "cache": "direct" if not self.cache else f"max-age {self.max_age:g} s",
                                        "open_handles": len(self._handles)}
            if self.native is not None:
                stats.update(self.native.stats())
            return json.dumps(stats, sort_keys=True).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    @_fuse_op
    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [STATS_XATTR] if inode == ROOT else []
