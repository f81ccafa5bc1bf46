"""vmcorefs.readpath.extents_of: a SparseFile's segments as the native
engine's (offset, length, fd, fd_offset, kind) extents."""

from __future__ import annotations

import os
from typing import Any

import pytest

from vmcorefs import readpath
from vmcorefs.core.layout import Segment, SparseFile
from vmcorefs.core.memmap import GuestPhysBlock
from vmcorefs.qemu.guest import Snapshot
from vmcorefs.qemu.memory import Source

# Under CI=true a missing native module fails (extents_of asserts it) instead of skipping.
pytestmark = pytest.mark.skipif(not readpath.available() and os.environ.get("CI") != "true",
                                reason="native read path not built")

BLOCKS = [GuestPhysBlock(0x0, 0xA0000, 0x7F0000000000, "pc.ram", "ram"),
          GuestPhysBlock(0x100000, 0x3FF00000, 0x7F0000100000, "pc.ram", "ram"),
          GuestPhysBlock(0x100000000, 0x40000000, 0x7F1000000000, "hi", "ram")]


def _snap(methods: list[str]) -> Snapshot:
    sources = [Source(b, 10 + i, 0x1000 * i if m == "shared" else b.hva, m, "x") for i, (b, m) in
               enumerate(zip(BLOCKS, methods))]
    none: Any = None
    return Snapshot(taken=0.0, blocks=tuple(BLOCKS), sources=tuple(sources), dump=none, vmcore=none,
                    pmem=none, vmcoreinfo=None, _starts=tuple(b.gpa for b in BLOCKS))


@pytest.mark.parametrize(
    "segments, methods, expected",
    [
        # one segment per block, as in vmcore: base + (gpa - block.gpa)
        ([Segment(0x2000, 0x0, 0xA0000)], ["shared"] * 3, [(0x2000, 0xA0000, 10, 0x0, 0)]),
        ([Segment(0x2000, 0x100000 + 0x5000, 0x1000)], ["shared", "procmem", "shared"],
         [(0x2000, 0x1000, 11, 0x7F0000100000 + 0x5000, 1)]),
        # a segment across a hole and into the next block is split; the hole is left out
        ([Segment(0x1000, 0x9F000, 0x62000)], ["shared"] * 3,
         [(0x1000, 0x1000, 10, 0x9F000, 0), (0x62000, 0x1000, 11, 0x1000, 0)]),
        # entirely outside RAM: no extent (reads as zeros)
        ([Segment(0x1000, 0xC0000, 0x1000)], ["shared"] * 3, []),
        # a kcore-like file: many small runs mapped anywhere
        ([Segment(0x1000 * i, 0x100000000 + 0x3000 * i, 0x1000) for i in range(1, 4)], ["procmem"] * 3,
         [(0x1000 * i, 0x1000, 12, 0x7F1000000000 + 0x3000 * i, 1) for i in range(1, 4)]),
    ],
)
def test_extents_of(segments: list[Segment], methods: list[str], expected: list[tuple[int, ...]]) -> None:
    size = max([s.offset + s.size for s in segments] + [0x100000])
    file = SparseFile(b"\x7fELF", tuple(segments), size)
    assert readpath.extents_of(file, _snap(methods)) == expected
