"""The FUSE adapter (pyfuse3, asyncio mode): inodes, directories and errno.

It maps FUSE requests onto a :class:`~vmcorefs.live.LiveCore` (the files
of one VM at the root) or a :class:`~vmcorefs.live.LiveDirectory` (one
directory per VM), which make every decision.  FUSE_READ is answered by the
native engine of :mod:`vmcorefs.readpath` when attached, else by
:meth:`VmcoreFS.read`.  The root's extended attribute ``user.vmcorefs.stats``
holds the read path's counters (JSON).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import stat
import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine, TypeVar, cast

import pyfuse3

from vmcorefs.errors import AccessError, NoSuchFileError, QMPTimeoutError, VmcorefsError
from vmcorefs.live import FILES, Attributes, Handle, LiveCore, LiveDirectory

if TYPE_CHECKING:
    from vmcorefs.readpath import NativeReads

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
BLKSIZE = 1 << 20
#: Inode numbers each live core takes: its directory, then one per file of FILES.
INODE_BLOCK = 16
FILE_INDEX = {spec.name: i for i, spec in enumerate(FILES)}
STATS_XATTR = b"user.vmcorefs.stats"

ERRNO = ((QMPTimeoutError, errno.ETIMEDOUT), (AccessError, errno.EACCES), (NoSuchFileError, errno.ENOENT))

Handler = TypeVar("Handler", bound=Callable[..., Coroutine[Any, Any, Any]])


def errno_of(exc: BaseException) -> int:
    """The one mapping from vmcorefs errors to errno."""
    for cls, code in ERRNO:
        if isinstance(exc, cls):
            return code
    return exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO


def drop_cache(inode: int) -> None:
    """Drop the kernel's cached pages of ``inode`` (blocks while pages are under read)."""
    try:
        pyfuse3.invalidate_inode(pyfuse3.InodeT(inode))
    except OSError as e:
        log.info("could not drop the page cache of inode %d: %s", inode, e)


def _fuse_op(fn: Handler) -> Handler:
    """Run a FUSE handler (logged with --debug), turning any failure into a FUSEError."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: VmcoreFS, /, *args: Any, **kwargs: Any) -> Any:
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

    return cast(Handler, wrapper)


class VmcoreFS(pyfuse3.Operations):
    """The mounted tree.  Inodes: the root is 1; each live core gets a block
    of ``INODE_BLOCK`` numbers when first seen (its directory -- the root for
    a lone core -- then one per file), never reused, so a VM that comes back
    is a new directory to the kernel."""

    def __init__(self, root: LiveCore | LiveDirectory, file_mode: int = 0o400) -> None:
        super().__init__()
        self.root = root
        #: The native read path, when attached (see vmcorefs.readpath).
        self.native: NativeReads | None = None
        #: Called once, at the first request after FUSE_INIT.
        self.on_first_request: Callable[[], None] | None = None
        self.file_mode = file_mode & 0o444
        self.dir_mode = 0o500 | self.file_mode | (self.file_mode >> 2)  # r-x where the files have r
        self.uid, self.gid = os.getuid(), os.getgid()
        self.created_ns = time.time_ns()
        self._base: dict[int, int] = {}  # id(core) -> its directory's inode
        self._cores: dict[int, LiveCore] = {}  # directory inode -> core
        self._next_base = ROOT + INODE_BLOCK
        self.handles: dict[int, tuple[Handle, int]] = {}  # fh -> (handle, inode)
        self._next_fh = 1
        if isinstance(root, LiveCore):
            self._base[id(root)] = ROOT
            self._cores[ROOT] = root

    # -- inodes ---------------------------------------------------------------
    def dir_of(self, core: LiveCore) -> int:
        """The directory inode of ``core`` (allocated on first use)."""
        base = self._base.get(id(core))
        if base is None:
            base, self._next_base = self._next_base, self._next_base + INODE_BLOCK
            self._base[id(core)] = base
            self._cores[base] = core
        return base

    def _inode(self, core: LiveCore, name: str) -> int:
        return self.dir_of(core) + 1 + FILE_INDEX[name]

    def _file_of(self, inode: int) -> tuple[LiveCore, str]:
        base = inode - (inode - ROOT) % INODE_BLOCK
        core = self._cores.get(base)
        i = inode - base - 1
        if core is None or not 0 <= i < len(FILES):
            raise NoSuchFileError("no such file or VM", str(inode))
        core.check_alive()  # a VM that went away: its files fail with EIO, as when QEMU dies
        return core, FILES[i].name

    def _dir_core(self, inode: int) -> LiveCore | None:
        """The core whose files directory ``inode`` lists; None for the root of many VMs."""
        if inode != ROOT and inode not in self._cores:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if isinstance(self.root, LiveDirectory):
            if inode == ROOT:
                return None
            if not self.root.holds(self._cores[inode]):
                raise pyfuse3.FUSEError(errno.ENOENT)  # a VM that went away
        return self._cores[inode]

    def drop_memory_caches(self, core: LiveCore) -> None:
        """Drop the cached pages of ``core``'s guest-memory files (its QEMU went away)."""
        for name in core.cached_memory_files():
            asyncio.get_running_loop().run_in_executor(None, drop_cache, self._inode(core, name))

    def _attr(self, inode: int, core: LiveCore | None, at: Attributes | None = None) -> pyfuse3.EntryAttributes:
        """A file's attributes, or a directory's when ``at`` is None."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.entry_timeout = 0
        a.attr_timeout = core.attr_timeout if core is not None else 0
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_ctime_ns = a.st_mtime_ns = core.created_ns if core is not None else self.created_ns
        a.st_blksize = BLKSIZE
        if at is None:
            a.st_mode, a.st_nlink = stat.S_IFDIR | self.dir_mode, 2
        else:
            a.st_mode, a.st_size, a.st_mtime_ns = stat.S_IFREG | self.file_mode, at.size, at.mtime_ns
            a.st_blocks = (at.size + 511) // 512
        return a

    async def _entry(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode == ROOT or inode in self._cores:
            return self._attr(inode, self._dir_core(inode))
        core, name = self._file_of(inode)
        return self._attr(inode, core, await core.stat_now(name))

    # -- FUSE operations ------------------------------------------------------
    @_fuse_op
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        core = self._dir_core(parent_inode)
        text = name.decode(errors="surrogateescape")
        if text in (".", ".."):
            return await self._entry(parent_inode if text == "." or core is None else ROOT)
        if core is None:  # the root of many VMs: a VM's directory
            assert isinstance(self.root, LiveDirectory)
            vm = self.root.cores.get(text)
            if vm is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(self.dir_of(vm), vm)
        if text not in FILE_INDEX:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._entry(self._inode(core, text))

    @_fuse_op
    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry(inode)

    @_fuse_op
    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        self._dir_core(inode)
        return pyfuse3.FileHandleT(inode)

    @_fuse_op
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        core = self._dir_core(fh)
        if core is None:  # one directory per VM, listed without touching any guest
            assert isinstance(self.root, LiveDirectory)
            vms = sorted(self.root.cores.items())[start_id:]
            entries = [(name, self._attr(self.dir_of(vm), vm)) for name, vm in vms]
        else:
            files = (await core.listing())[start_id:]
            entries = [(name, self._attr(self._inode(core, name), core, at)) for name, at in files]
        for i, (name, attr) in enumerate(entries, start_id):
            if not pyfuse3.readdir_reply(token, name.encode(errors="surrogateescape"), attr, i + 1):
                break

    @_fuse_op
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_fuse_op
    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        core, name = self._file_of(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        handle = await core.open(name)
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self.handles[fh] = (handle, inode)
        if self.native is not None:
            try:
                self.native.register(fh, handle.file, handle.snap.pid)
            except (ValueError, MemoryError) as e:  # served by read() below instead
                log.warning("native read path refused %s: %s", name, e)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=handle.direct, keep_cache=False)

    @_fuse_op
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        # pyfuse3 sends the reply before any other handler runs (no await here),
        # so the live core's reused buffer is safe to reply from.
        handle, _ = self.handles[fh]
        return cast(bytes, handle.core.read(handle, off, size))

    @_fuse_op
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        entry = self.handles.pop(fh, None)
        if entry is None:
            return
        handle, inode = entry
        if self.native is not None:
            self.native.unregister(fh)
        if await handle.core.release(handle):
            # In a thread: invalidation waits for pages under read, whose
            # replies this event loop must stay free to send.
            await asyncio.get_running_loop().run_in_executor(None, drop_cache, inode)

    @_fuse_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLKSIZE
        s.f_namemax = 255
        return s

    @_fuse_op
    async def getxattr(self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode != ROOT or name != STATS_XATTR:
            raise pyfuse3.FUSEError(errno.ENODATA)
        stats: dict[str, object] = {"reads": "native" if self.native is not None else "python",
                                    "open_handles": len(self.handles)}
        if isinstance(self.root, LiveCore):
            stats["cache"] = self.root.cache_policy
        if self.native is not None:
            stats.update(self.native.stats())
        return json.dumps(stats, sort_keys=True).encode()

    @_fuse_op
    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [STATS_XATTR] if inode == ROOT else []
