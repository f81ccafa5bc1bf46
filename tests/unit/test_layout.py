"""SparseFile: where each byte of a read comes from (layout.py, build_pmem)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unit_support import fake_mem, fake_mem_byte, materialise, read_via_extents

from vmcorefs.core.elf import build_pmem
from vmcorefs.core.layout import Extent, ExtentKind, SparseFile
from vmcorefs.core.layout import memory as Segment

GiB = 1 << 30

# prefix [0, 100), zeros [100, 4096), seg A [4096, 12288) <- gpa 0x10000,
# zeros [12288, 16384), seg B [16384, 20480) <- gpa 4 GiB, zeros to 24576.
PREFIX = bytes(range(100))
SF = SparseFile(
    PREFIX,
    (Segment(4096, 0x10000, 8192), Segment(16384, 4 * GiB, 4096)),
    24576,
)


@pytest.mark.parametrize(
    "offset, length, expected",
    [
        pytest.param(0, 50, [Extent(0, 50, ExtentKind.PREFIX, 0)], id="prefix-only"),
        pytest.param(0, 100, [Extent(0, 100, ExtentKind.PREFIX, 0)], id="whole-prefix"),
        pytest.param(90, 20, [Extent(90, 10, ExtentKind.PREFIX, 90), Extent(100, 10, ExtentKind.ZERO, 0)],
                     id="prefix-into-gap"),
        pytest.param(50, 4096, [Extent(50, 50, ExtentKind.PREFIX, 50), Extent(100, 3996, ExtentKind.ZERO, 0),
                                Extent(4096, 50, ExtentKind.MEMORY, 0x10000)],
                     id="prefix-zeros-segment"),
        pytest.param(200, 100, [Extent(200, 100, ExtentKind.ZERO, 0)], id="inside-gap"),
        pytest.param(4096, 8192, [Extent(4096, 8192, ExtentKind.MEMORY, 0x10000)], id="exact-segment"),
        pytest.param(5000, 100, [Extent(5000, 100, ExtentKind.MEMORY, 0x10000 + 904)], id="inside-segment"),
        pytest.param(12000, 5000, [Extent(12000, 288, ExtentKind.MEMORY, 0x10000 + 7904),
                                   Extent(12288, 4096, ExtentKind.ZERO, 0),
                                   Extent(16384, 616, ExtentKind.MEMORY, 4 * GiB)],
                     id="segment-gap-segment"),
        pytest.param(12288, 4096, [Extent(12288, 4096, ExtentKind.ZERO, 0)], id="exact-gap"),
        pytest.param(20000, 10000, [Extent(20000, 480, ExtentKind.MEMORY, 4 * GiB + 3616),
                                    Extent(20480, 4096, ExtentKind.ZERO, 0)],
                     id="segment-trailing-zeros-eof"),
        pytest.param(24000, 1000, [Extent(24000, 576, ExtentKind.ZERO, 0)], id="eof-clipped"),
        pytest.param(24575, 1, [Extent(24575, 1, ExtentKind.ZERO, 0)], id="last-byte"),
        pytest.param(0, 1 << 70, [Extent(0, 100, ExtentKind.PREFIX, 0), Extent(100, 3996, ExtentKind.ZERO, 0),
                                  Extent(4096, 8192, ExtentKind.MEMORY, 0x10000),
                                  Extent(12288, 4096, ExtentKind.ZERO, 0),
                                  Extent(16384, 4096, ExtentKind.MEMORY, 4 * GiB),
                                  Extent(20480, 4096, ExtentKind.ZERO, 0)],
                     id="huge-length-whole-file"),
        pytest.param(24576, 10, [], id="at-eof"),
        pytest.param(24577, 10, [], id="past-eof"),
        pytest.param(1 << 64, 4096, [], id="huge-offset"),
        pytest.param(1000, 0, [], id="zero-length"),
        pytest.param(1000, -5, [], id="negative-length"),
        pytest.param(-10, 20, [Extent(0, 10, ExtentKind.PREFIX, 0)], id="negative-offset-clipped-at-0"),
        pytest.param(-100, 50, [], id="negative-offset-ends-before-0"),
    ],
)
def test_extents_table(offset: int, length: int, expected: list[Extent]) -> None:
    assert list(SF.extents(offset, length)) == expected


def test_extents_match_materialised_file_table() -> None:
    whole = materialise(SF)
    for offset in range(0, SF.size + 10, 97):
        for length in (1, 7, 100, 4096, 5000, 30000):
            assert read_via_extents(SF, offset, length) == whole[offset:offset + length]


@pytest.mark.parametrize(
    "prefix, segments, size",
    [
        pytest.param(b"x" * 10, (Segment(5, 0, 10),), 100, id="overlaps-prefix"),
        pytest.param(b"", (Segment(100, 0, 10), Segment(50, 0, 10)), 200, id="unsorted"),
        pytest.param(b"", (Segment(0, 0, 100), Segment(99, 0, 10)), 200, id="overlapping"),
        pytest.param(b"", (Segment(0, 0, 100),), 99, id="beyond-size"),
        pytest.param(b"x" * 10, (), 9, id="prefix-beyond-size"),
        pytest.param(b"", (Segment(0, 0, -1),), 10, id="negative-segment"),
    ],
)
def test_invalid_sparse_files_rejected(prefix: bytes, segments: tuple[Segment, ...], size: int) -> None:
    with pytest.raises(ValueError):
        SparseFile(prefix, segments, size)


def test_empty_file_has_no_extents() -> None:
    sf = SparseFile(b"", (), 0)
    assert list(sf.extents(0, 4096)) == []


def test_zero_size_segments_are_skipped() -> None:
    sf = SparseFile(b"ab", (Segment(10, 0x500, 0), Segment(10, 0x1000, 5), Segment(20, 0x9000, 0)), 30)
    assert list(sf.extents(0, 100)) == [
        Extent(0, 2, ExtentKind.PREFIX, 0), Extent(2, 8, ExtentKind.ZERO, 0), Extent(10, 5, ExtentKind.MEMORY, 0x1000),
        Extent(15, 5, ExtentKind.ZERO, 0), Extent(20, 10, ExtentKind.ZERO, 0),
    ]


def test_pmem_file_offset_is_gpa() -> None:
    # Blocks as QEMU's pc machine with 5 GiB has them (unsorted on purpose).
    blocks = [(0x100000000, 2 * GiB), (0, 0xC0000), (0x100000, 0xBFF00000), (0xFFFC0000, 0x40000)]
    pmem = build_pmem(blocks)
    assert pmem.prefix == b""
    assert pmem.size == 0x100000000 + 2 * GiB
    assert [s.offset for s in pmem.segments] == sorted(g for g, _ in blocks)
    for ext in pmem.extents(0, pmem.size):
        if ext.kind == "mem":
            assert ext.src == ext.offset
    assert list(pmem.extents(0xC0000, 0x40000)) == [Extent(0xC0000, 0x40000, ExtentKind.ZERO, 0)]
    assert list(pmem.extents(0xFFFFFFF0, 0x20)) == [Extent(0xFFFFFFF0, 0x10, ExtentKind.MEMORY, 0xFFFFFFF0),
                                                    Extent(0x100000000, 0x10, ExtentKind.MEMORY, 0x100000000)]
    assert build_pmem([]) == SparseFile(b"", (), 0)


# --- properties --------------------------------------------------------------


@st.composite
def sparse_files(draw: st.DrawFn, max_gap: int = 300, max_seg: int = 300) -> SparseFile:
    prefix = draw(st.binary(max_size=200))
    pos = len(prefix)
    segs = []
    for _ in range(draw(st.integers(0, 8))):
        pos += draw(st.integers(0, max_gap))
        size = draw(st.integers(0, max_seg))
        gpa = draw(st.one_of(st.integers(0, 1 << 20), st.integers(0, (1 << 64) - (1 << 20))))
        segs.append(Segment(pos, gpa, size))
        pos += size
    size = pos + draw(st.integers(0, max_gap))
    return SparseFile(prefix, tuple(segs), size)


@st.composite
def file_and_read(draw: st.DrawFn) -> tuple[SparseFile, int, int]:
    sf = draw(sparse_files())
    offset = draw(st.integers(-50, sf.size + 50))
    length = draw(st.one_of(st.integers(-5, sf.size + 100), st.just(1 << 64)))
    return sf, offset, length


@settings(max_examples=250, deadline=None)
@given(file_and_read())
def test_extents_properties(case: tuple[SparseFile, int, int]) -> None:
    sf, offset, length = case
    exts = list(sf.extents(offset, length))
    start, end = max(offset, 0), min(offset + length, sf.size)
    if start >= end:
        assert exts == []
        return
    # Contiguous, non-empty, covering exactly [start, end).
    assert exts[0].offset == start
    assert exts[-1].offset + exts[-1].length == end
    for a, b in zip(exts, exts[1:]):
        assert a.offset + a.length == b.offset
    plen = len(sf.prefix)
    live = [s for s in sf.segments if s.length > 0]
    boundaries = {plen} | {s.offset for s in live} | {s.end for s in live}
    for ext in exts:
        lo, hi = ext.offset, ext.offset + ext.length
        assert ext.length > 0
        assert not any(lo < b < hi for b in boundaries), f"{ext} crosses a boundary"
        if ext.kind == ExtentKind.PREFIX:
            assert hi <= plen and ext.src == lo
        elif ext.kind == ExtentKind.MEMORY:
            (seg,) = [s for s in live if s.offset <= lo and hi <= s.end]
            assert ext.src == seg.src + (lo - seg.offset)
        else:
            assert ext.kind == ExtentKind.ZERO and ext.src == 0
            assert lo >= plen
            assert all(hi <= s.offset or lo >= s.end for s in live)


@settings(max_examples=200, deadline=None)
@given(file_and_read())
def test_extents_reference_model(case: tuple[SparseFile, int, int]) -> None:
    sf, offset, length = case
    whole = materialise(sf)
    start, end = max(offset, 0), min(offset + length, sf.size)
    expected = whole[start:end] if start < end else b""
    assert read_via_extents(sf, offset, length) == expected


def test_fake_memory_is_position_dependent() -> None:
    # Guard for the reference model: a wrong gpa must give different bytes.
    assert fake_mem(0, 4) != fake_mem(1, 4)
    assert len(set(fake_mem(0, 256))) == 256
    assert fake_mem(1000, 600) == bytes(fake_mem_byte(g) for g in range(1000, 1600))
    assert fake_mem((1 << 64) - 3, 3) == bytes(fake_mem_byte(g) for g in range((1 << 64) - 3, 1 << 64))
