"""Sparse file model: a file made of literal bytes, guest memory and zeros.

Every mounted file is a :class:`SparseFile`:

* ``vmcore`` / ``kcore``: ``prefix`` = ELF header + program headers +
  PT_NOTE data, then one memory :class:`Extent` per PT_LOAD at its
  page-aligned ``p_offset``;
* ``pmem``: no prefix, one extent per guest-physical block at
  ``file offset == GPA``;
* ``vmcoreinfo``, ``gdbinit``: a prefix only.

Everything not covered by the prefix or an extent reads as zeros.  The model
is pure: :meth:`SparseFile.extents` only says where each byte comes from.

One record, :class:`Extent`, names "``length`` bytes of the file at
``offset`` come from ``src`` of some ``kind``" everywhere: in a layout
(``kind`` :attr:`ExtentKind.MEMORY`, ``src`` a guest-physical address), in a
layout resolved to QEMU's memory (:attr:`~ExtentKind.SHARED` or
:attr:`~ExtentKind.PROCMEM`, ``src`` an offset into descriptor ``fd``), and
in the pieces of one read (:attr:`~ExtentKind.PREFIX`, :attr:`~ExtentKind.ZERO`
too).  The native read path (``_readpath.c``, ``enum extent_kind``) uses the
same numbers and the same field order.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Iterable, Iterator, NamedTuple

#: The page size of every guest vmcorefs serves (x86-64) and of the file layouts.
PAGE_SIZE = 4096


def align_up(value: int, align: int = PAGE_SIZE) -> int:
    """``value`` rounded up to a multiple of ``align``."""
    return (value + align - 1) // align * align


class ExtentKind(IntEnum):
    """Where the bytes of an :class:`Extent` come from (``enum extent_kind`` in C)."""

    #: Bytes of the file's own ``prefix``, from offset ``src``.
    PREFIX = 0
    #: Zeros (gaps between segments, guest-physical ranges that are not RAM).
    ZERO = 1
    #: Guest memory at guest-physical address ``src`` (a layout, not yet resolved).
    MEMORY = 2
    #: A shared backing file of guest RAM (memfd, file): ``fd`` at offset ``src``.
    SHARED = 3
    #: QEMU's private RAM: host-virtual address ``src`` of the QEMU process
    #: (``process_vm_readv``; ``fd`` is ``/proc/PID/mem``).
    PROCMEM = 4


class Extent(NamedTuple):
    """``length`` bytes at file offset ``offset`` come from ``src`` (see ``kind``).

    ``fd`` is the descriptor to read for :attr:`ExtentKind.SHARED` and
    :attr:`ExtentKind.PROCMEM` extents, -1 otherwise.
    """

    offset: int
    length: int
    kind: ExtentKind
    src: int
    fd: int = -1

    @property
    def end(self) -> int:
        return self.offset + self.length


def memory(offset: int, gpa: int, length: int) -> Extent:
    """A layout extent: ``length`` bytes of guest-physical ``gpa`` at file ``offset``."""
    return Extent(offset, length, ExtentKind.MEMORY, gpa)


@dataclass(frozen=True)
class SparseFile:
    """A file of ``size`` bytes: ``prefix`` at offset 0, then ``segments``.

    ``segments`` are memory extents (:attr:`ExtentKind.MEMORY`, or resolved
    :attr:`~ExtentKind.SHARED` / :attr:`~ExtentKind.PROCMEM`), sorted by
    offset, not overlapping each other or the prefix, ending at or before
    ``size``.  Raises ``ValueError`` otherwise.
    """

    prefix: bytes
    segments: tuple[Extent, ...]
    size: int
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        end = len(self.prefix)
        for seg in self.segments:
            if seg.offset < end or seg.length < 0:
                raise ValueError(f"segment at {seg.offset:#x} overlaps or is unsorted")
            end = seg.offset + seg.length
        if end > self.size:
            raise ValueError(f"contents end at {end:#x}, beyond size {self.size:#x}")
        object.__setattr__(self, "_starts", tuple(s.offset for s in self.segments))

    @classmethod
    def text(cls, text: str) -> "SparseFile":
        """A file holding ``text`` (UTF-8) and nothing else."""
        data = text.encode()
        return cls(data, (), len(data))

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Yield the extents covering ``[offset, offset+length)``, clipped to EOF.

        Prefix bytes come as :attr:`ExtentKind.PREFIX` (``src`` = offset in
        ``prefix``), gaps as :attr:`ExtentKind.ZERO`, segments clipped to
        the request with ``src`` advanced accordingly.
        """
        end = min(offset + length, self.size)
        pos = max(offset, 0)
        if pos >= end:
            return
        plen = len(self.prefix)
        if pos < plen:
            n = min(end, plen) - pos
            yield Extent(pos, n, ExtentKind.PREFIX, pos)
            pos += n
        i = max(bisect.bisect_right(self._starts, pos) - 1, 0)
        segs = self.segments
        while pos < end:
            if i < len(segs):
                seg = segs[i]
                seg_end = seg.offset + seg.length
                if pos >= seg_end:
                    i += 1
                    continue
                if pos < seg.offset:
                    n = min(end, seg.offset) - pos
                    yield Extent(pos, n, ExtentKind.ZERO, 0)
                    pos += n
                    continue
                n = min(end, seg_end) - pos
                yield Extent(pos, n, seg.kind, seg.src + (pos - seg.offset), seg.fd)
                pos += n
                i += 1
            else:
                yield Extent(pos, end - pos, ExtentKind.ZERO, 0)
                pos = end

    def resolve(self, resolve: Callable[[int, int], Iterable[Extent]]) -> "SparseFile":
        """The same file with every memory segment resolved to where it is read.

        ``resolve(gpa, length)`` yields, for one guest-physical range, the
        resolved extents covering it with offsets relative to ``gpa`` (ranges
        it leaves out read as zeros).  Their ``offset`` is moved to the file.
        """
        out: list[Extent] = []
        for seg in self.segments:
            for x in resolve(seg.src, seg.length):
                out.append(x._replace(offset=seg.offset + x.offset))
        return SparseFile(self.prefix, tuple(out), self.size)
