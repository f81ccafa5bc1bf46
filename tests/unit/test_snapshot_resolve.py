"""Snapshot.resolve: a layout's guest-physical segments as the extents reads
use (``SHARED``: backing file offset, ``PROCMEM``: QEMU host-virtual address),
the same records the native engine registers."""

from __future__ import annotations

import pytest
from unit_support import DATA

from vmcorefs.core.elf import parse_qemu_dump
from vmcorefs.core.layout import Extent, ExtentKind, SparseFile, memory
from vmcorefs.core.memmap import GuestPhysBlock
from vmcorefs.qemu.guest import Snapshot
from vmcorefs.qemu.memory import Source

SHARED, PROCMEM = ExtentKind.SHARED, ExtentKind.PROCMEM
BLOCKS = [GuestPhysBlock(0x0, 0xA0000, 0x7F0000000000, "pc.ram", "ram"),
          GuestPhysBlock(0x100000, 0x3FF00000, 0x7F0000100000, "pc.ram", "ram"),
          GuestPhysBlock(0x100000000, 0x40000000, 0x7F1000000000, "hi", "ram")]
DUMP = parse_qemu_dump((DATA / "qemu72-onebyte-dump.elf").read_bytes())


def _snap(kinds: list[ExtentKind]) -> Snapshot:
    sources = [Source(b, 10 + i, 0x1000 * i if k == SHARED else b.hva, k, "x")
               for i, (b, k) in enumerate(zip(BLOCKS, kinds))]
    return Snapshot.build(BLOCKS, sources, DUMP, alive=lambda: True, taken=0.0)


@pytest.mark.parametrize(
    "segments, kinds, expected",
    [
        # one segment per block, as in vmcore: base + (gpa - block.gpa)
        ([memory(0x2000, 0x0, 0xA0000)], [SHARED] * 3, [Extent(0x2000, 0xA0000, SHARED, 0x0, 10)]),
        ([memory(0x2000, 0x100000 + 0x5000, 0x1000)], [SHARED, PROCMEM, SHARED],
         [Extent(0x2000, 0x1000, PROCMEM, 0x7F0000100000 + 0x5000, 11)]),
        # a segment across a hole and into the next block is split; the hole is left out
        ([memory(0x1000, 0x9F000, 0x62000)], [SHARED] * 3,
         [Extent(0x1000, 0x1000, SHARED, 0x9F000, 10), Extent(0x62000, 0x1000, SHARED, 0x1000, 11)]),
        # entirely outside RAM: no extent (reads as zeros)
        ([memory(0x1000, 0xC0000, 0x1000)], [SHARED] * 3, []),
        # beyond the last block
        ([memory(0x1000, 0x200000000, 0x1000)], [SHARED] * 3, []),
        # a kcore-like file: many small runs mapped anywhere
        ([memory(0x1000 * i, 0x100000000 + 0x3000 * i, 0x1000) for i in range(1, 4)], [PROCMEM] * 3,
         [Extent(0x1000 * i, 0x1000, PROCMEM, 0x7F1000000000 + 0x3000 * i, 12) for i in range(1, 4)]),
    ],
)
def test_resolve(segments: list[Extent], kinds: list[ExtentKind], expected: list[Extent]) -> None:
    size = max([s.end for s in segments] + [0x100000])
    file = SparseFile(b"\x7fELF", tuple(segments), size)
    resolved = _snap(kinds).resolve(file)
    assert list(resolved.segments) == expected
    assert (resolved.prefix, resolved.size) == (file.prefix, file.size)


def test_vmcore_and_pmem_of_a_snapshot() -> None:
    snap = _snap([SHARED] * 3)
    assert [(s.offset, s.src) for s in snap.pmem.segments] == [(b.gpa, b.gpa) for b in BLOCKS]
    assert [s.src for s in snap.vmcore.segments] == [b.gpa for b in BLOCKS]
    assert snap.source_for(0x100000 + 5).block == BLOCKS[1]
