"""Reading guest memory from the QEMU process, without ever writing it.

Two methods, chosen per RAM block:

``shared``
    The block lives in a shared file mapping of QEMU (``memory-backend-memfd``,
    ``memory-backend-file`` or hugetlbfs with ``share=on``).  The file is found
    from the block's host address in ``/proc/PID/maps`` and opened read-only
    through ``/proc/PID/map_files/START-END`` or, failing that, the matching
    ``/proc/PID/fd/N`` (same device and inode).  Reads are ``pread`` on it:
    holes read as zeros and allocate nothing (an mmap would fault them in).

``procmem``
    Anything else (QEMU's default private RAM): ``pread`` on
    ``/proc/PID/mem`` at the block's host address.  Needs ptrace access to
    QEMU (root or CAP_SYS_PTRACE).

Both reduce to "pread(fd, base + (gpa - block.gpa))": a :class:`Source`
resolves guest-physical ranges to :class:`~vmcorefs.core.layout.Extent` records
of kind ``SHARED`` or ``PROCMEM`` (:meth:`Source.extent`), and
:func:`read_extent` reads either.  Pages that cannot be read (unmapped in
QEMU) read as zeros; a QEMU that has exited raises :class:`QEMUGoneError`.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Callable

from vmcorefs.core.layout import PAGE_SIZE, Extent, ExtentKind
from vmcorefs.core.memmap import GuestPhysBlock
from vmcorefs.errors import AccessError, QEMUGoneError, UsageError

MODES = ("auto", "shared", "procmem")

_MAPS_RE = re.compile(
    r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+)\s+(?P<perms>\S{4})\s+(?P<off>[0-9a-f]+)\s+"
    r"(?P<dev>[0-9a-f]+:[0-9a-f]+)\s+(?P<ino>\d+)\s*(?P<path>.*)$"
)


class NotSharedError(UsageError, AccessError):
    """``--memory shared`` for guest RAM that is not in a shared file
    mapping: an option the guest cannot satisfy (a usage error, exit 2),
    and no way to its memory (an :class:`AccessError`, EACCES for an open)."""


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str

    @property
    def shared_file(self) -> bool:
        return self.perms[3] == "s" and self.inode != 0


def parse_maps(text: str) -> list[Mapping]:
    """The lines of ``/proc/PID/maps`` text as :class:`Mapping` records (others skipped)."""
    out: list[Mapping] = []
    for line in text.splitlines():
        m = _MAPS_RE.match(line)
        if not m:
            continue
        major, minor = (int(x, 16) for x in m.group("dev").split(":"))
        out.append(Mapping(int(m.group("start"), 16), int(m.group("end"), 16), m.group("perms"),
                           int(m.group("off"), 16), (major, minor), int(m.group("ino")),
                           m.group("path")))
    return out


@dataclass(frozen=True)
class Source:
    """Where a block's bytes are read: ``pread(fd, size, base + delta)``.

    ``kind`` is :attr:`ExtentKind.SHARED` (``fd`` a backing file, ``base``
    the block's offset in it) or :attr:`ExtentKind.PROCMEM` (``fd``
    ``/proc/PID/mem``, ``base`` the block's host-virtual address); ``path``
    names the file for ``vmcorefs info``.
    """

    block: GuestPhysBlock
    fd: int
    base: int
    kind: ExtentKind
    path: str

    @property
    def method(self) -> str:
        """``shared`` or ``procmem`` (the ``--memory`` names)."""
        return self.kind.name.lower()

    def extent(self, offset: int, gpa: int, length: int) -> Extent:
        """``length`` bytes of guest-physical ``gpa`` (inside this block) at file ``offset``."""
        return Extent(offset, length, self.kind, self.base + (gpa - self.block.gpa), self.fd)


class ProcessMemory:
    """Read-only access to the memory of QEMU process ``pid``.

    Keeps one ``/proc/PID/mem`` descriptor and one descriptor per backing
    file (keyed by device and inode) for the life of the mount, so a layout
    refresh costs no re-opening.
    """

    def __init__(self, pid: int | None, mode: str = "auto") -> None:
        if mode not in MODES:
            raise UsageError(f"--memory must be one of {', '.join(MODES)}, not {mode!r}")
        self.pid = pid
        self.mode = mode
        self._mem_fd: int | None = None
        self._files: dict[tuple[tuple[int, int], int], int] = {}

    def close(self) -> None:
        for fd in [*self._files.values(), *([self._mem_fd] if self._mem_fd is not None else [])]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._files.clear()
        self._mem_fd = None

    def _require_pid(self) -> int:
        if self.pid is None:
            raise AccessError("cannot see the QEMU process (SO_PEERCRED gave no PID)",
                              "run vmcorefs in QEMU's PID namespace, on the same host")
        return self.pid

    def _proc_mem(self) -> int:
        if self._mem_fd is None:
            pid = self._require_pid()
            try:
                self._mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except PermissionError:
                raise AccessError(f"no permission to read /proc/{pid}/mem of QEMU",
                                  "run as root or with CAP_SYS_PTRACE, or give the guest a shared"
                                  " memory backend (memory-backend-memfd,share=on)") from None
            except FileNotFoundError:
                raise QEMUGoneError(f"QEMU (pid {pid}) has exited") from None
        return self._mem_fd

    def _open_backing(self, pid: int, m: Mapping) -> int | None:
        key = (m.dev, m.inode)
        if key in self._files:
            return self._files[key]
        candidates = [f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"]
        try:
            candidates += [f"/proc/{pid}/fd/{n}" for n in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            pass
        for path in candidates:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_ino != m.inode or (os.major(st.st_dev), os.minor(st.st_dev)) != m.dev:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            self._files[key] = fd
            return fd
        return None

    def sources(self, blocks: list[GuestPhysBlock]) -> list[Source]:
        """How to read each block (one :class:`Source` per block, same order), per ``mode``.

        Costs one read of ``/proc/PID/maps`` (not for ``procmem``) and, the
        first time a backing file is seen, a scan of ``/proc/PID/fd``.
        Raises :class:`AccessError` (no permission), :class:`NotSharedError`
        (``shared`` asked for a block that is not in a shared file mapping),
        :class:`QEMUGoneError` (QEMU exited).
        """
        pid = self._require_pid()
        maps: list[Mapping] = []
        if self.mode != "procmem":
            try:
                with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                    maps = parse_maps(f.read())
            except FileNotFoundError:
                raise QEMUGoneError(f"QEMU (pid {pid}) has exited") from None
            except PermissionError:
                raise AccessError(f"no permission to read /proc/{pid}/maps of QEMU",
                                  "run as QEMU's user or as root") from None
        out: list[Source] = []
        for b in blocks:
            src = self._shared_source(pid, b, maps) if self.mode != "procmem" else None
            if src is None:
                if self.mode == "shared" and b.kind == "ram":
                    raise NotSharedError(f"--memory shared: guest RAM {b.name!r} at {b.gpa:#x} is not in a shared"
                                         " file mapping", "give QEMU memory-backend-memfd/-file with share=on,"
                                         " or use --memory procmem or auto")
                src = Source(b, self._proc_mem(), b.hva, ExtentKind.PROCMEM, f"/proc/{pid}/mem")
            out.append(src)
        return out

    def _shared_source(self, pid: int, b: GuestPhysBlock, maps: list[Mapping]) -> Source | None:
        for m in maps:
            if m.start <= b.hva < m.end:
                if not m.shared_file or b.hva + b.size > m.end:
                    return None
                fd = self._open_backing(pid, m)
                if fd is None:
                    return None
                return Source(b, fd, m.offset + (b.hva - m.start), ExtentKind.SHARED, m.path)
        return None

    def alive(self) -> bool:
        """False once QEMU (``pid``) has exited; True when it cannot be told."""
        if self.pid is None:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


_ZEROS = memoryview(bytes(1 << 20))


def zero_fill(buf: memoryview) -> None:
    """Set ``buf`` to zeros without allocating."""
    pos = 0
    while pos < len(buf):
        n = min(len(buf) - pos, len(_ZEROS))
        buf[pos:pos + n] = _ZEROS[:n]
        pos += n


def read_extent(ext: Extent, buf: memoryview, alive: Callable[[], bool]) -> None:
    """Fill ``buf`` (at most ``ext.length`` bytes) from a ``SHARED`` or
    ``PROCMEM`` extent: ``pread(ext.fd, len(buf), ext.src)``.

    Pages that cannot be read, and bytes past the end of a backing file,
    become zeros.  Raises :class:`QEMUGoneError` when ``/proc/PID/mem``
    stops answering and ``alive()`` says QEMU exited.
    """
    total = len(buf)
    off = ext.src
    try:
        n = os.preadv(ext.fd, [buf], off)
    except OSError:
        n = 0
    if n == total:  # the common case: one system call
        return
    pos = n
    while pos < total:
        try:
            n = os.preadv(ext.fd, [buf[pos:]], off + pos)
        except OSError as e:
            if e.errno == errno.ESRCH or not alive():
                raise QEMUGoneError("QEMU has exited") from None
            # Unreadable (e.g. EIO/EFAULT for a page QEMU unmapped): zeros.
            nxt = min(total, (off + pos + PAGE_SIZE) // PAGE_SIZE * PAGE_SIZE - off)
            zero_fill(buf[pos:nxt])
            pos = nxt
            continue
        if n == 0:
            if ext.kind == ExtentKind.PROCMEM and not alive():
                raise QEMUGoneError("QEMU has exited")
            zero_fill(buf[pos:])
            return
        pos += n
