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
import time
from typing import TYPE_CHECKING, Any, Callable, Concatenate, Coroutine, ParamSpec, TypeVar, cast

import pyfuse3

from vmcorefs.errors import AccessError, NoSuchFileError, QMPTimeoutError, VmcorefsError
from vmcorefs.live import FILES, Handle, LiveCore, LiveDirectory

if TYPE_CHECKING:
    from vmcorefs.readpath import NativeReads

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
BLKSIZE = 1 << 20
#: Inode numbers each live core takes: its directory, then one per file.
INODE_BLOCK = 16
#: Position of each file in FILES (its inode is the directory's + 1 + this).
BY_NAME_INDEX = {spec.name: i for i, spec in enumerate(FILES)}
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
    """The mounted tree: the files of one live core at the root, or (a
    :class:`~vmcorefs.live.LiveDirectory`) one directory per VM.

    Inodes: the root is 1; each live core gets a block of ``INODE_BLOCK``
    numbers when first seen -- its directory (the root for a single core)
    and one per entry of :data:`~vmcorefs.live.FILES` -- never reused, so a
    VM that comes back is a new directory to the kernel.
    """

    enable_writeback_cache = False

    def __init__(self, root: LiveCore | LiveDirectory, file_mode: int = 0o400) -> None:
        super().__init__()
        self.root = root
        #: The native read path, when attached (see vmcorefs.readpath).
        self.native: NativeReads | None = None
        #: Called once, at the first request after FUSE_INIT.
        self.on_first_request: Callable[[], None] | None = None
        #: Permission bits of the files; directories get r-x where they have r.
        self.file_mode = file_mode & 0o444
        self.dir_mode = 0o500 | self.file_mode | (self.file_mode >> 2)
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

    # -- the tree -----------------------------------------------------------
    def dir_of(self, core: LiveCore) -> int:
        """The directory inode of ``core`` (allocated on first use)."""
        base = self._base.get(id(core))
        if base is None:
            base, self._next_base = self._next_base, self._next_base + INODE_BLOCK
            self._base[id(core)] = base
            self._cores[base] = core
        return base

    def _file_of(self, inode: int) -> tuple[LiveCore, str]:
        base = inode - (inode - ROOT) % INODE_BLOCK
        core = self._cores.get(base)
        i = inode - base - 1
        if core is None or not 0 <= i < len(FILES):
            raise NoSuchFileError("no such file or VM", str(inode))
        core.check_alive()  # a VM that went away: its files fail with EIO, as when QEMU dies
        return core, FILES[i].name

    def _dir_core(self, inode: int) -> LiveCore | None:
        """The core whose files ``inode`` lists; None for the root of many VMs."""
        if inode == ROOT and isinstance(self.root, LiveDirectory):
            return None
        core = self._cores.get(inode)
        if core is None or (isinstance(self.root, LiveDirectory) and self.root.cores.get(core.name) is not core):
            raise pyfuse3.FUSEError(errno.ENOENT)  # a VM that went away
        return core

    def drop_memory_caches(self, core: LiveCore) -> None:
        """Drop the cached pages of ``core``'s guest-memory files (its QEMU went away)."""
        if core.cache:
            loop = asyncio.get_running_loop()
            base = self.dir_of(core)
            for i, spec in enumerate(FILES):
                if spec.guest_memory:
                    loop.run_in_executor(None, drop_cache, base + 1 + i)

    def _attr(self, inode: int, core: LiveCore | None, size: int = 0, mtime_ns: int | None = None,
              is_dir: bool = False) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = 0
        a.attr_timeout = core.attr_timeout if core is not None else 0
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_ctime_ns = core.created_ns if core is not None else self.created_ns
        a.st_mtime_ns = a.st_ctime_ns if mtime_ns is None else mtime_ns
        a.st_blksize = BLKSIZE
        if is_dir:
            a.st_mode, a.st_nlink = stat.S_IFDIR | self.dir_mode, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | self.file_mode, 1, size
        a.st_blocks = (size + 511) // 512
        return a

    async def _entry(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode == ROOT or inode in self._cores:
            core = self._dir_core(inode)
            return self._attr(inode, core, is_dir=True)
        core, name = self._file_of(inode)
        snap = await core.current()
        at = core.stat(name, snap)
        return self._attr(inode, core, at.size, at.mtime_ns)

    # -- FUSE operations --------------------------------------------------
    @_fuse_op
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT and parent_inode not in self._cores:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        core = self._dir_core(parent_inode)
        text = name.decode(errors="surrogateescape")
        if text in (".", ".."):
            return await self._entry(parent_inode if text == "." or core is None else ROOT)
        if core is None:  # the root of many VMs: a VM's directory
            assert isinstance(self.root, LiveDirectory)
            vm = self.root.cores.get(text)
            if vm is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(self.dir_of(vm), vm, is_dir=True)
        index = BY_NAME_INDEX.get(text)
        if index is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._entry(self.dir_of(core) + 1 + index)

    @_fuse_op
    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry(inode)

    @_fuse_op
    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if inode != ROOT and inode not in self._cores:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self._dir_core(inode)
        return pyfuse3.FileHandleT(inode)

    @_fuse_op
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        core = self._dir_core(fh)
        if core is None:  # one directory per VM, listed without touching any guest
            assert isinstance(self.root, LiveDirectory)
            for i, (name, vm) in enumerate(sorted(self.root.cores.items())):
                if i < start_id:
                    continue
                if not pyfuse3.readdir_reply(token, name.encode(errors="surrogateescape"),
                                             self._attr(self.dir_of(vm), vm, is_dir=True), i + 1):
                    break
            return
        snap = await core.current()
        base = self.dir_of(core)
        for i, (spec, _file) in enumerate(core.listed(snap)):
            inode = base + 1 + BY_NAME_INDEX[spec.name]
            if i < start_id:
                continue
            at = core.stat(spec.name, snap)
            if not pyfuse3.readdir_reply(token, spec.name.encode(), self._attr(inode, core, at.size, at.mtime_ns),
                                         i + 1):
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
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = (handle, inode)
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
        """``user.vmcorefs.stats`` on the mount's root: the read path's counters (JSON)."""
        if inode == ROOT and name == STATS_XATTR:
            core = self.root if isinstance(self.root, LiveCore) else None
            stats: dict[str, object] = {"reads": "native" if self.native is not None else "python",
                                        "open_handles": len(self.handles)}
            if core is not None:
                stats["cache"] = "direct" if not core.cache else f"max-age {core.max_age:g} s"
            if self.native is not None:
                stats.update(self.native.stats())
            return json.dumps(stats, sort_keys=True).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    @_fuse_op
    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [STATS_XATTR] if inode == ROOT else []
