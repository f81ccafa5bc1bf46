"""Sparse file model: a file made of literal bytes, guest memory and zeros.

Both mounted views are instances of :class:`SparseFile`:

* ``vmcore``: ``prefix`` = ELF header + program headers + PT_NOTE data,
  then one :class:`Segment` per PT_LOAD at its page-aligned ``p_offset``;
* ``pmem``: no prefix, one segment per RAM block at ``file offset == GPA``.

Everything not covered by the prefix or a segment reads as zeros.  The model
is pure: :meth:`SparseFile.extents` only says where each byte comes from;
the FUSE adapter does the reading.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple


class Segment(NamedTuple):
    """``size`` bytes of guest memory from ``gpa`` appear at file ``offset``."""

    offset: int
    gpa: int
    size: int


class Extent(NamedTuple):
    """One piece of a read: ``length`` bytes at file offset ``offset``.

    ``kind`` is ``"data"`` (bytes from the prefix starting at ``src``),
    ``"mem"`` (guest memory from guest-physical ``src``) or ``"zero"``.
    """

    kind: str
    offset: int
    length: int
    src: int


@dataclass(frozen=True)
class SparseFile:
    """A file of ``size`` bytes: ``prefix`` at offset 0, then ``segments``.

    Segments must be sorted by offset, must not overlap each other or the
    prefix, and must end at or before ``size``.
    """

    prefix: bytes
    segments: tuple[Segment, ...]
    size: int
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        end = len(self.prefix)
        for seg in self.segments:
            if seg.offset < end or seg.size < 0:
                raise ValueError(f"segment at {seg.offset:#x} overlaps or is unsorted")
            end = seg.offset + seg.size
        if end > self.size:
            raise ValueError(f"contents end at {end:#x}, beyond size {self.size:#x}")
        object.__setattr__(self, "_starts", tuple(s.offset for s in self.segments))

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Yield the extents covering ``[offset, offset+length)``, clipped to EOF."""
        end = min(offset + length, self.size)
        pos = max(offset, 0)
        if pos >= end:
            return
        plen = len(self.prefix)
        if pos < plen:
            n = min(end, plen) - pos
            yield Extent("data", pos, n, pos)
            pos += n
        i = bisect.bisect_right(self._starts, pos) - 1
        if i < 0:
            i = 0
        segs = self.segments
        while pos < end:
            if i < len(segs):
                seg = segs[i]
                seg_end = seg.offset + seg.size
                if pos >= seg_end:
                    i += 1
                    continue
                if pos < seg.offset:
                    n = min(end, seg.offset) - pos
                    yield Extent("zero", pos, n, 0)
                    pos += n
                    continue
                n = min(end, seg_end) - pos
                yield Extent("mem", pos, n, seg.gpa + (pos - seg.offset))
                pos += n
                i += 1
            else:
                yield Extent("zero", pos, end - pos, 0)
                pos = end
