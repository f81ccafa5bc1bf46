"""The FUSE adapter (pyfuse3, asyncio mode): inodes, directories and errno.

Every decision -- which files a VM has, snapshots, ``--freeze``, page-cache
coherence, QEMU going away -- is the :class:`~vmcorefs.live.LiveCore`'s;
this module maps FUSE requests onto it.  The root directory holds the files
of one live core; inodes are numbered per (directory, name) so that a
directory level (one live core per VM) fits the same tables.

Reads: with ``direct_io`` per handle as the live core decides, and
``keep_cache`` off (the cache starts empty at each open).  FUSE_READ itself
is answered by the native engine of :mod:`vmcorefs.readpath` when attached
(each open registers its resolved layout there); :meth:`VmcoreFS.read`
serves reads otherwise.  The root's extended attribute ``user.vmcorefs.stats``
holds the read path's counters (JSON).  Errors become errno in one place,
:func:`errno_of`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import stat
from typing import TYPE_CHECKING, Any, Callable, Concatenate, Coroutine, ParamSpec, TypeVar, cast

import pyfuse3

from vmcorefs.errors import AccessError, NoSuchFileError, QMPTimeoutError, VmcorefsError
from vmcorefs.live import FILES, Handle, LiveCore

if TYPE_CHECKING:
    from vmcorefs.readpath import NativeReads

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
BLKSIZE = 1 << 20
#: Extended attribute of the root directory with the read path's counters.
STATS_XATTR = b"user.vmcorefs.stats"

T = TypeVar("T")
P = ParamSpec("P")


def errno_of(exc: BaseException) -> int:
    """The one mapping from vmcorefs errors to errno."""
    if isinstance(exc, QMPTimeoutError):
        return errno.ETIMEDOUT
    if isinstance(exc, AccessError):
        return errno.EACCES
    if isinstance(exc, NoSuchFileError):
        return errno.ENOENT
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def drop_cache(inode: int) -> None:
    """Drop the kernel's cached pages of ``inode`` (blocks while pages are under read)."""
    try:
        pyfuse3.invalidate_inode(pyfuse3.InodeT(inode))
    except OSError as e:
        log.info("could not drop the page cache of inode %d: %s", inode, e)


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
            log.info("%s: %s", name, e)
            raise pyfuse3.FUSEError(errno_of(e)) from None
        except Exception as e:  # a bug: keep serving, say where
            log.error("%s failed", name, exc_info=True)
            raise pyfuse3.FUSEError(errno_of(e)) from None

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = fn.__doc__
    return wrapper


class VmcoreFS(pyfuse3.Operations):
    """The mounted directory of one live core."""

    enable_writeback_cache = False

    def __init__(self, core: LiveCore, file_mode: int = 0o400) -> None:
        super().__init__()
        self.core = core
        #: The native read path, when attached (see vmcorefs.readpath).
        self.native: NativeReads | None = None
        #: Called once, at the first request after FUSE_INIT.
        self.on_first_request: Callable[[], None] | None = None
        #: Permission bits of the files; the directory gets r-x where they have r.
        self.file_mode = file_mode & 0o444
        self.dir_mode = 0o500 | self.file_mode | (self.file_mode >> 2)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.inodes = {spec.name: ROOT + 1 + i for i, spec in enumerate(FILES)}
        self.names = {ino: name for name, ino in self.inodes.items()}
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1

    def drop_memory_caches(self) -> None:
        """Drop the cached pages of every guest-memory file (QEMU went away)."""
        if self.core.cache:
            loop = asyncio.get_running_loop()
            for spec in FILES:
                if spec.guest_memory:
                    loop.run_in_executor(None, drop_cache, self.inodes[spec.name])

    def _attr(self, inode: int, size: int = 0, mtime_ns: int | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = 0
        a.attr_timeout = self.core.attr_timeout
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_ctime_ns = self.core.created_ns
        a.st_mtime_ns = self.core.created_ns if mtime_ns is None else mtime_ns
        a.st_blksize = BLKSIZE
        if inode == ROOT:
            a.st_mode, a.st_nlink = stat.S_IFDIR | self.dir_mode, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | self.file_mode, 1, size
        a.st_blocks = (size + 511) // 512
        return a

    async def _file_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        name = self.names.get(inode)
        if name is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        snap = await self.core.current()
        at = self.core.stat(name, snap)
        return self._attr(inode, at.size, at.mtime_ns)

    # -- FUSE operations --------------------------------------------------
    @_fuse_op
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(ROOT)
        inode = self.inodes.get(name.decode(errors="replace"))
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._file_attr(inode)

    @_fuse_op
    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(ROOT) if inode == ROOT else await self._file_attr(inode)

    @_fuse_op
    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(ROOT)

    @_fuse_op
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        snap = await self.core.current()
        for spec, file in self.core.listed(snap):
            inode = self.inodes[spec.name]
            if inode <= start_id:
                continue
            at = self.core.stat(spec.name, snap)
            if not pyfuse3.readdir_reply(token, spec.name.encode(), self._attr(inode, at.size, at.mtime_ns), inode):
                break

    @_fuse_op
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_fuse_op
    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        name = self.names.get(inode)
        if name is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        handle = await self.core.open(name)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        if self.native is not None:
            try:
                self.native.register(fh, handle.file)
            except (ValueError, MemoryError) as e:  # served by read() below instead
                log.warning("native read path refused %s: %s", name, e)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=handle.direct, keep_cache=False)

    @_fuse_op
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        # pyfuse3 sends the reply before any other handler runs (no await here),
        # so the live core's reused buffer is safe to reply from.
        return cast(bytes, self.core.read(self.handles[fh], off, size))

    @_fuse_op
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        if self.native is not None:
            self.native.unregister(fh)
        if await self.core.release(handle):
            # In a thread: invalidation waits for pages under read, whose
            # replies this event loop must stay free to send.
            await asyncio.get_running_loop().run_in_executor(None, drop_cache, self.inodes[handle.spec.name])

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
            core = self.core
            stats: dict[str, object] = {"reads": "native" if self.native is not None else "python",
                                        "cache": "direct" if not core.cache else f"max-age {core.max_age:g} s",
                                        "open_handles": len(self.handles)}
            if self.native is not None:
                stats.update(self.native.stats())
            return json.dumps(stats, sort_keys=True).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    @_fuse_op
    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [STATS_XATTR] if inode == ROOT else []
