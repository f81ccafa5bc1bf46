"""x86-64 page-table walk (walk, clip_runs, cr3_to_root, kernel_root_from_vmcoreinfo)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paging_support import GiB1, KiB4, MiB2, PageTables, PhysMem, clip, coalesce, naive_walk
from unit_support import DATA

from vmcorefs.core.elf import parse_qemu_dump
from vmcorefs.core.notes import parse_notes, parse_vmcoreinfo, vmcoreinfo_text
from vmcorefs.core.paging import (
    KERNEL_HALF,
    PAGE_PSE,
    PageWalk,
    Run,
    clip_runs,
    cr3_to_root,
    kernel_root_from_vmcoreinfo,
    walk,
)
from vmcorefs.errors import FormatError

U64 = 1 << 64
K4 = KERNEL_HALF[4]  # 0xffff800000000000
K5 = KERNEL_HALF[5]  # 0xff00000000000000
PAGE_OFFSET = 0xFFFF_8880_0000_0000  # Linux direct map (no KASLR)
VMALLOC = 0xFFFF_C900_0000_0000
VMEMMAP = 0xFFFF_EA00_0000_0000
KTEXT = 0xFFFF_FFFF_8000_0000
ESPFIX = 0xFFFF_FF00_0000_0000


def do_walk(pt: PageTables, **kw: int) -> PageWalk:
    kw.setdefault("phys_limit", pt.mem.limit)
    return walk(pt.mem.read, pt.root, levels=pt.levels, **kw)


def check_invariants(w: PageWalk, start: int, end: int, max_runs: int = 1 << 20) -> None:
    """What holds for any walk, hostile tables included."""
    assert len(w.runs) <= max_runs
    prev_end = -1
    for r in w.runs:
        assert r.size > 0 and r.vaddr % KiB4 == 0 and r.size % KiB4 == 0 and r.paddr % KiB4 == 0
        assert start <= r.vaddr and r.vaddr + r.size <= end
        assert r.vaddr >= prev_end
        assert 0 <= r.paddr < 1 << 52
        prev_end = r.vaddr + r.size


# --- cr3_to_root ---------------------------------------------------------------


@pytest.mark.parametrize(
    "cr3, root",
    [
        pytest.param(0x1C0A000, 0x1C0A000, id="plain"),
        pytest.param(0x1C0A000 | 0xFFF, 0x1C0A000, id="pcid-pwt-pcd"),
        pytest.param((1 << 63) | 0x1C0A005, 0x1C0A000, id="noflush-bit63"),
        pytest.param((3 << 61) | 0x1C0A000, 0x1C0A000, id="lam-bits"),
        pytest.param(0x000F_FFFF_FFFF_F000, 0x000F_FFFF_FFFF_F000, id="max-phys"),
    ],
)
def test_cr3_to_root(cr3: int, root: int) -> None:
    assert cr3_to_root(cr3) == root


# --- walk: exact tables --------------------------------------------------------


@pytest.mark.parametrize("levels", [4, 5])
def test_mixed_page_sizes(levels: int) -> None:
    mem = PhysMem()
    pt = PageTables(mem, levels)
    k = KERNEL_HALF[levels]
    # 1 GiB + 2 MiB + 4 KiB pages, physically and virtually contiguous: one run.
    assert pt.map(k, 0x40000000, GiB1)
    assert pt.map(k + GiB1, 0x80000000, MiB2)
    assert pt.map(k + GiB1 + MiB2, 0x80200000, KiB4)
    # A gap in paddr: new run.  A gap in vaddr: new run.
    assert pt.map(k + GiB1 + MiB2 + KiB4, 0x5000, KiB4)
    assert pt.map(k + 3 * GiB1, 0x5000 + KiB4, KiB4)
    # The last page of the address space.
    assert pt.map(U64 - KiB4, 0x9000, KiB4)
    w = do_walk(pt)
    assert w.runs == [
        Run(k, 0x40000000, GiB1 + MiB2 + KiB4),
        Run(k + GiB1 + MiB2 + KiB4, 0x5000, KiB4),
        Run(k + 3 * GiB1, 0x6000, KiB4),
        Run(U64 - KiB4, 0x9000, KiB4),
    ]
    assert not w.truncated and w.skipped == 0 and w.shared == 0
    assert w.translate(k + 5) == 0x40000005
    assert w.translate(k + GiB1 + MiB2 + 7) == 0x80200007
    assert w.translate(k + 2 * GiB1) is None
    assert w.translate(U64 - 1) == 0x9FFF
    assert w.translate(0) is None


def test_flags_are_ignored_and_large_page_pat_bit_masked() -> None:
    mem = PhysMem()
    pt = PageTables(mem)
    nx, pkey, sw, pat_large, pat_4k = 1 << 63, 0xF << 59, 0x7F << 52, 1 << 12, 1 << 7
    assert pt.map(K4, 0, MiB2, flags=nx | pkey | sw | pat_large | 0x1FF)
    assert pt.map(K4 + MiB2, MiB2, KiB4, flags=nx | sw | pat_4k | 0x17F)  # bit 7 of a PTE is PAT, not PS
    assert pt.map(K4 + GiB1, GiB1, GiB1, flags=pat_large | nx)
    w = do_walk(pt)
    assert w.runs == [Run(K4, 0, MiB2 + KiB4), Run(K4 + GiB1, GiB1, GiB1)]


def test_canonical_hole_is_not_coalesced() -> None:
    """The last user page and the first kernel page are adjacent raw addresses."""
    mem = PhysMem()
    pt = PageTables(mem)
    assert pt.map(0x7FFF_FFFF_F000, 0x1000, KiB4)
    assert pt.map(K4, 0x2000, KiB4)
    assert pt.map(0, 0x3000, KiB4)
    w = do_walk(pt, start=0)
    assert w.runs == [Run(0, 0x3000, KiB4), Run(0x7FFF_FFFF_F000, 0x1000, KiB4), Run(K4, 0x2000, KiB4)]
    assert do_walk(pt).runs == [Run(K4, 0x2000, KiB4)]  # default: kernel half only
    assert do_walk(pt, start=0, end=0x7FFF_FFFF_F000).runs == [Run(0, 0x3000, KiB4)]
    # A range starting in the non-canonical hole.
    assert do_walk(pt, start=0x8000_0000_0000, end=U64).runs == [Run(K4, 0x2000, KiB4)]


def test_range_clips_large_pages() -> None:
    mem = PhysMem()
    pt = PageTables(mem)
    assert pt.map(K4 + GiB1, 0x40000000, GiB1)
    assert pt.map(K4 + 2 * GiB1, 0x80000000, MiB2)
    w = do_walk(pt, start=K4 + GiB1 + 3 * KiB4, end=K4 + 2 * GiB1 + 5 * KiB4)
    assert w.runs == [Run(K4 + GiB1 + 3 * KiB4, 0x40003000, GiB1 - 3 * KiB4 + 5 * KiB4)]
    assert do_walk(pt, start=K4, end=K4).runs == []
    assert mem.reads.count(pt.root) == 1  # the empty range read nothing


def test_5level_kernel_half_default() -> None:
    mem = PhysMem()
    pt = PageTables(mem, 5)
    assert pt.map(K5, 0x1000, KiB4)  # first kernel-half address under LA57
    assert pt.map(0xFF11_0000_0000_0000, 0, MiB2)  # LA57 direct map
    assert pt.map(K4, 0x2000, KiB4)
    w = do_walk(pt)
    assert w.runs == [Run(K5, 0x1000, KiB4), Run(0xFF11_0000_0000_0000, 0, MiB2), Run(K4, 0x2000, KiB4)]


def test_direct_map_512m_of_4k_pages_is_one_run() -> None:
    mem = PhysMem()
    pt = PageTables(mem)
    pt.map_4k_range(PAGE_OFFSET, 0, 512 << 20)
    w = do_walk(pt)
    assert w.runs == [Run(PAGE_OFFSET, 0, 512 << 20)]
    assert w.tables_read == 3 + 256  # PML4, PDPT, PD, 256 PTs
    assert len(mem.reads) == w.tables_read


def linux_like(levels: int = 4) -> PageTables:
    """A kernel half shaped like Linux x86-64 (4-level, no KASLR, no KASAN)."""
    mem = PhysMem()
    pt = PageTables(mem, levels, table_base=0x20000000)
    pt.map_4k_range(PAGE_OFFSET, 0, 64 << 20)          # direct map (4 KiB: rodata=full)
    for i in range(8):                                 # vmalloc: scattered pages with guards
        pt.map_4k_range(VMALLOC + i * 5 * KiB4, 0x3000000 + i * 0x10000, 4 * KiB4)
    for i in range(2):                                 # vmemmap, 2 MiB
        assert pt.map(VMEMMAP + i * MiB2, 0x1E00000 + i * MiB2, MiB2)
    for i in range(16):                                # kernel text, 2 MiB
        assert pt.map(KTEXT + 0x1000000 + i * MiB2, 0x1000000 + i * MiB2, MiB2)
    # ESPFIX (arch/x86/kernel/espfix_64.c): 4 PUD clones -> one PMD page,
    # 512 PMD clones -> one PTE page, 32 PTE clones (stride 16) -> one stack page.
    pud, pmd, pte, stack = pt.alloc(), pt.alloc(), pt.alloc(), 0x2FFF000
    pt.mem.set(pt.root + 8 * pt.index(ESPFIX, 4), pud | 0x63)
    for n in range(4):
        pt.mem.set(pud + 8 * n, pmd | 0x63)
    for n in range(512):
        pt.mem.set(pmd + 8 * n, pte | 0x63)
    for n in range(32):
        pt.mem.set(pte + 8 * 16 * n, stack | 0x161)
    return pt


def test_linux_like_kernel_half() -> None:
    pt = linux_like()
    w = do_walk(pt)
    espfix = [r for r in w.runs if ESPFIX <= r.vaddr < ESPFIX + (1 << 39)]
    others = [r for r in w.runs if r not in espfix]
    assert others == coalesce(pt.mapped)
    # Each shared table is expanded once: the first PMD clone's 32 stack aliases.
    assert espfix == [Run(ESPFIX + 16 * KiB4 * n, 0x2FFF000, KiB4) for n in range(32)]
    assert w.shared == 3 + 511 and w.skipped == 0 and not w.truncated
    assert len(others) == 1 + 8 + 1 + 1


def test_linux_like_shared_tables_expanded_when_allowed() -> None:
    pt = linux_like()
    w = do_walk(pt, max_visits=1 << 20)
    espfix = [r for r in w.runs if ESPFIX <= r.vaddr < ESPFIX + (1 << 39)]
    assert len(espfix) == 4 * 512 * 32
    assert {r.paddr for r in espfix} == {0x2FFF000}
    assert w.shared == 0 and not w.truncated


# --- walk: properties ----------------------------------------------------------


@st.composite
def extents(draw: st.DrawFn, levels: int) -> tuple[int, int, int, int, int]:
    """(va, pa, page size, count, flags) near table boundaries, often adjacent."""
    size = draw(st.sampled_from([KiB4, MiB2, GiB1]))
    top_shift = 12 + 9 * (levels - 1)
    top = draw(st.sampled_from([256, 257, 300, 510, 511]))
    base = ((top << top_shift) | (U64 - (1 << (top_shift + 9)))) % U64
    span = 1 << top_shift
    hot = [0, 1, 509, 510, 511, 512, 1023, 512 * 512 - 2]
    off = (draw(st.sampled_from(hot)) + draw(st.integers(0, 3))) * size % span
    count = draw(st.integers(1, 3 if size == GiB1 else 24))
    count = min(count, (span - off) // size)
    pa = (draw(st.sampled_from([0, 1, 511, 512, 4096])) + draw(st.integers(0, 3))) * size
    flags = draw(st.sampled_from([0x63, 0x163, (1 << 63) | 0x63, (0x7F << 52) | 0x1E3]))
    if size > KiB4:
        flags |= draw(st.sampled_from([0, 1 << 12]))  # PAT bit of a large page
    return base + off, pa, size, count, flags


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, int, int, int]]]:
    """Extents; some continue the previous one (both sides) with another page size."""
    levels = draw(st.sampled_from([4, 5]))
    out: list[tuple[int, int, int, int, int]] = []
    for _ in range(draw(st.integers(1, 10))):
        follow = draw(st.booleans())
        if out and follow:
            va, pa, size, count, flags = out[-1]
            va, pa = va + size * count, pa + size * count
            fits = [s for s in (KiB4, MiB2, GiB1) if va % s == 0 and pa % s == 0 and va + s <= U64]
            if fits:
                size = draw(st.sampled_from(fits))
                count = draw(st.integers(1, 3 if size == GiB1 else 24))
                count = min(count, (U64 - va) // size)
                if size == KiB4:
                    flags &= ~(1 << 12)  # a 4 KiB page's bit 12 is an address bit
                out.append((va, pa, size, count, flags))
                continue
        out.append(draw(extents(levels)))
    return levels, out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.data())
def test_walk_matches_mappings(layout: tuple[int, list[tuple[int, int, int, int, int]]], data: st.DataObject) -> None:
    levels, exts = layout
    mem = PhysMem()
    pt = PageTables(mem, levels, table_base=0x10_0000_0000)  # tables far from the leaves' pa
    mem.limit = 1 << 40
    for va, pa, size, count, flags in exts:
        for i in range(count):
            pt.map(va + i * size, pa + i * size, size, flags)
    expected = coalesce(pt.mapped)
    w = do_walk(pt)
    assert w.runs == expected
    assert not w.truncated and w.skipped == 0 and w.shared == 0
    assert w.tables_read == len(mem.reads) <= pt.tables
    check_invariants(w, KERNEL_HALF[levels], U64)
    # Every mapped page translates; nothing else is covered.
    assert sum(r.size for r in w.runs) == sum(m.size for m in pt.mapped)
    for m in pt.mapped:
        for off in {0, m.size // 2 + 8, m.size - KiB4, m.size - 1}:
            assert w.translate(m.vaddr + off) == m.paddr + off
    # A sub-range gives the clipped mappings.
    cuts = sorted(data.draw(st.lists(st.sampled_from([r.vaddr for r in expected] + [
        r.vaddr + r.size // 2 // KiB4 * KiB4 for r in expected] + [KERNEL_HALF[levels], U64]),
        min_size=2, max_size=2)))
    assert do_walk(pt, start=cuts[0], end=cuts[1]).runs == clip(expected, cuts[0], cuts[1])


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 2000), st.sampled_from([KiB4, MiB2]), st.integers(0, 511), st.integers(0, 1000))
def test_contiguous_input_is_one_run(pages: int, size: int, first: int, pfn: int) -> None:
    mem = PhysMem()
    pt = PageTables(mem, 4, table_base=0x10_0000_0000)
    mem.limit = 1 << 40
    va = VMALLOC + first * size
    for i in range(pages):
        assert pt.map(va + i * size, pfn * size + i * size, size)
    assert do_walk(pt).runs == [Run(va, pfn * size, pages * size)]


# --- walk: hostile tables ------------------------------------------------------


def test_pml4_entry_pointing_to_itself() -> None:
    mem = PhysMem(1 << 30)
    pt = PageTables(mem)
    assert pt.map(K4, 0x1000, KiB4)
    mem.set(pt.root + 8 * 511, pt.root | 0x63)
    w = do_walk(pt)
    assert w.runs == coalesce(pt.mapped) and w.shared == 1 and mem.reads.count(pt.root) == 1
    # Allowed to revisit, the loop is cut by depth: PML4[511] read as PDPT,
    # PD and PT maps its own slot 511 as a 4 KiB page of the root.
    w = do_walk(pt, max_visits=100)
    assert w.runs[-1] == Run(U64 - KiB4, pt.root, KiB4)
    assert not w.truncated and len(mem.reads) <= 1 + 3 + 4 * 512


@pytest.mark.parametrize("levels", [4, 5])
def test_tables_beyond_phys_limit_are_not_read(levels: int) -> None:
    limit = 64 << 20
    mem = PhysMem(1 << 52)
    pt = PageTables(mem, levels)
    assert pt.map(K4, 0x1000, KiB4)
    mem.set(pt.root + 8 * 300, limit | 0x63)                     # first page past the limit
    mem.set(pt.root + 8 * 301, (limit - KiB4) | 0x63)            # last page below: read (empty)
    mem.set(pt.root + 8 * 302, 0x000F_FFFF_FFFF_F000 | 0x63)     # top of the 52-bit space
    mem.set(pt.root + 8 * 303, (1 << 63) | (limit * 2) | 0x63)   # NX set, still beyond
    mem.set(pt.root + 8 * 304, 0x5000 | 0x63 | PAGE_PSE)         # PS in a PML4E/PML5E is reserved
    w = walk(mem.read, pt.root, levels=levels, phys_limit=limit)
    assert w.runs == coalesce(pt.mapped)
    assert w.skipped == 4 and not w.truncated
    assert all(a + KiB4 <= limit for a in mem.reads)
    assert limit - KiB4 in mem.reads


def test_root_beyond_phys_limit() -> None:
    mem = PhysMem(1 << 52)
    w = walk(mem.read, 1 << 40, phys_limit=1 << 30)
    assert w == PageWalk([], False, 0, 1, 0)


def fan_out(levels: int) -> tuple[PhysMem, int]:
    """One table whose 512 entries all point at itself: 512**levels paths."""
    mem = PhysMem(1 << 30)
    table = 0x200000
    for i in range(512):
        mem.set(table + 8 * i, table | 0x63)
    return mem, table


@pytest.mark.parametrize("levels", [4, 5])
def test_exponential_fan_out_is_bounded(levels: int) -> None:
    mem, table = fan_out(levels)
    # Default: each table is expanded once, so the self-references cost nothing.
    w = walk(mem.read, table, levels=levels, phys_limit=mem.limit)
    assert len(mem.reads) == w.tables_read == 1 and w.shared == 256 and w.runs == []
    assert not w.truncated
    # Refused references count against max_tables too: 1 read + 99 refused.
    w = walk(mem.read, table, levels=levels, phys_limit=mem.limit, max_tables=100)
    assert w.truncated and w.tables_read == 1 and w.shared == 99
    # Revisits allowed: bounded by max_tables, reported as truncated.
    mem.reads.clear()
    w = walk(mem.read, table, levels=levels, phys_limit=mem.limit, max_tables=300, max_visits=1 << 30)
    assert w.truncated and len(mem.reads) == w.tables_read == 300
    # Each PT read maps 512 aliases of the same page: 512 runs per PT.
    pts = 300 - (levels - 1)
    assert len(w.runs) == pts * 512 and {r.paddr for r in w.runs} == {table}
    check_invariants(w, KERNEL_HALF[levels], U64)
    # ... and by max_runs.
    mem.reads.clear()
    w = walk(mem.read, table, levels=levels, phys_limit=mem.limit, max_runs=1000, max_visits=1 << 30)
    assert w.truncated and len(w.runs) == 1000 and len(mem.reads) <= 1000 // 512 + levels


def test_max_runs_keeps_pending_run_when_tables_run_out() -> None:
    mem = PhysMem()
    pt = PageTables(mem)
    pt.map_4k_range(PAGE_OFFSET, 0, 4 * MiB2)
    w = do_walk(pt, max_tables=4)  # PML4, PDPT, PD, first PT
    assert w.truncated and w.runs == [Run(PAGE_OFFSET, 0, MiB2)]
    w = do_walk(pt, max_tables=7)  # exactly enough: not truncated
    assert not w.truncated and w.runs == [Run(PAGE_OFFSET, 0, 4 * MiB2)]
    assert do_walk(pt, max_runs=0).truncated
    assert do_walk(pt, max_runs=1).runs == [Run(PAGE_OFFSET, 0, 4 * MiB2)]


def test_unreadable_and_short_tables() -> None:
    mem = PhysMem()
    pt = PageTables(mem)
    assert pt.map(K4, 0x1000, KiB4)
    assert pt.map(PAGE_OFFSET, 0x2000, KiB4)
    assert pt.map(VMALLOC, 0x3000, KiB4)
    pte = pt.table_for(K4, 1)
    assert pte is not None
    mem.bad.add(pte)               # GuestMemoryError: skipped
    mem.short.add(pt.root)         # 100 bytes = entries 0..11 (+4 bytes): the rest are zero
    w = do_walk(pt)
    assert w.runs == [] and w.skipped == 0
    mem.short.clear()
    w = do_walk(pt)
    assert w.runs == [Run(PAGE_OFFSET, 0x2000, KiB4), Run(VMALLOC, 0x3000, KiB4)] and w.skipped == 1


class Boom(Exception):
    pass


def test_other_read_errors_propagate() -> None:
    def read(addr: int, length: int) -> bytes:
        raise Boom
    with pytest.raises(Boom):
        walk(read, 0x1000, phys_limit=1 << 30)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, U64 - 1), st.integers(0, 7), st.sampled_from([4, 5]))
def test_random_bytes_as_tables(seed: int, root_page: int, levels: int) -> None:
    blob = random.Random(seed).randbytes(8 * KiB4)
    mem = PhysMem(len(blob))
    for i in range(8):
        mem.pages[i * KiB4] = bytearray(blob[i * KiB4:(i + 1) * KiB4])
    w = walk(mem.read, root_page * KiB4, levels=levels, phys_limit=mem.limit, start=0, max_tables=64)
    assert len(mem.reads) == w.tables_read <= 8  # each table once
    check_invariants(w, 0, U64)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, U64 - 1), st.sampled_from([4, 5]), st.integers(1, 4) | st.integers(5, 1000), st.floats(0, 1))
def test_random_tables_pointing_at_each_other(seed: int, levels: int, visits: int, present: float) -> None:
    """16 tables whose entries point among them and just past them: loops, sharing, fan-out."""
    rng = random.Random(seed)
    mem = PhysMem(16 * KiB4)
    for n in range(16 * 512):
        # Random flags (PS half the time), random high bits, present with probability ``present``.
        entry = (rng.randrange(32) * KiB4) | rng.getrandbits(12) & ~1 | (rng.getrandbits(12) << 52)
        mem.set(n * 8, entry | (rng.random() < present))
    max_tables, max_runs = 200, 5000
    w = walk(mem.read, 0, levels=levels, phys_limit=mem.limit, start=0,
             max_tables=max_tables, max_runs=max_runs, max_visits=visits)
    assert len(mem.reads) == w.tables_read <= max_tables
    check_invariants(w, 0, U64, max_runs)
    if not w.truncated:
        assert w.tables_read <= 16 * visits
    if not w.truncated and visits <= 4:
        leaves, skipped, shared = naive_walk(mem, 0, levels, mem.limit, 0, U64, visits)
        assert (w.runs, w.skipped, w.shared) == (coalesce(leaves), skipped, shared)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, U64 - 1), st.sampled_from([4, 5]), st.integers(1, 3), st.floats(0, 1),
       st.sampled_from([0x63, 0x80, 0xFFF, 1 << 63]), st.data())
def test_walk_equals_naive_walk(seed: int, levels: int, visits: int, present: float, flags: int,
                                data: st.DataObject) -> None:
    """Tables of mostly contiguous entries (runs, PS, holes, loops) against an entry-by-entry walk."""
    rng = random.Random(seed)
    ntables = 8
    mem = PhysMem(ntables * KiB4)
    for t in range(ntables):
        pa = rng.randrange(1 << 20) << 30
        for i in range(512):
            if rng.random() < 0.05:  # pointer to a table, or just past the last one
                entry = rng.randrange(ntables + 1) * KiB4 | 0x63
            else:
                if rng.random() < 0.1:
                    pa = rng.randrange(1 << 20) << 30
                entry = pa | (flags & rng.getrandbits(64)) | (rng.getrandbits(1) << 12)
                pa += rng.choice([KiB4, MiB2, GiB1])
            mem.set(t * KiB4 + 8 * i, entry | (rng.random() < present))
    k = KERNEL_HALF[levels]
    points = [0, 0x7FFF_FFFF_F000, k, k + GiB1 + 7 * KiB4, U64 - MiB2 - KiB4, U64]
    start, end = sorted(data.draw(st.lists(st.sampled_from(points), min_size=2, max_size=2)))
    w = walk(mem.read, 0, levels=levels, phys_limit=mem.limit, start=start, end=end, max_visits=visits)
    leaves, skipped, shared = naive_walk(mem, 0, levels, mem.limit, start, end, visits)
    assert not w.truncated
    assert (w.runs, w.skipped, w.shared) == (coalesce(leaves), skipped, shared)
    check_invariants(w, start, end)


def test_bad_arguments() -> None:
    mem = PhysMem()
    with pytest.raises(ValueError):
        walk(mem.read, 0x1000, levels=3, phys_limit=1 << 30)
    with pytest.raises(ValueError):
        walk(mem.read, 0x1001, phys_limit=1 << 30)
    with pytest.raises(ValueError):
        walk(mem.read, 0x1000, phys_limit=1 << 30, start=K4 + 1)
    with pytest.raises(ValueError):
        walk(mem.read, 0x1000, phys_limit=1 << 30, start=K4, end=K4 - KiB4)
    assert mem.reads == []


# --- clip_runs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "runs, ram, expected",
    [
        pytest.param([Run(K4, 0, 0x10000)], [(0, 0x10000)], [Run(K4, 0, 0x10000)], id="inside"),
        pytest.param([Run(K4, 0, 0x10000)], [(0x4000, 0x1000)], [Run(K4 + 0x4000, 0x4000, 0x1000)], id="middle"),
        pytest.param([Run(K4, 0, 0x10000)], [(0, 0x2000), (0x8000, 0x10000)],
                     [Run(K4, 0, 0x2000), Run(K4 + 0x8000, 0x8000, 0x8000)], id="hole"),
        pytest.param([Run(K4, 0, 0x10000)], [(0, 0x2000), (0x2000, 0x2000), (0x1000, 0x8000)],
                     [Run(K4, 0, 0x9000)], id="adjacent-and-overlapping-blocks-merge"),
        pytest.param([Run(K4, 0xFEE00000, 0x1000)], [(0, 0x8000000)], [], id="mmio"),
        pytest.param([Run(K4 + 0x5000, 0x100000, 0x1000), Run(K4, 0x100000, 0x1000)], [(0x100000, 0x1000), (0, 0)],
                     [Run(K4 + 0x5000, 0x100000, 0x1000), Run(K4, 0x100000, 0x1000)], id="order-kept-aliases"),
    ],
)
def test_clip_runs(runs: list[Run], ram: list[tuple[int, int]], expected: list[Run]) -> None:
    assert clip_runs(runs, ram) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 16)), max_size=6),
       st.lists(st.tuples(st.integers(0, 64), st.integers(0, 16)), max_size=6))
def test_clip_runs_pagewise(runs_pages: list[tuple[int, int]], ram_pages: list[tuple[int, int]]) -> None:
    runs = [Run(K4 + i * 0x100000, p * KiB4, n * KiB4) for i, (p, n) in enumerate(runs_pages)]
    ram = [(p * KiB4, n * KiB4) for p, n in ram_pages]
    in_ram = {p for p, n in ram_pages for p in range(p, p + n)}
    out = clip_runs(runs, ram)
    got = {(r.vaddr + o, r.paddr + o) for r in out for o in range(0, r.size, KiB4)}
    want = {(r.vaddr + o, r.paddr + o) for r in runs for o in range(0, r.size, KiB4)
            if (r.paddr + o) // KiB4 in in_ram}
    assert got == want and sum(r.size for r in out) == len(want) * KiB4


# --- kernel_root_from_vmcoreinfo -------------------------------------------------

BASE_VCI = {"SYMBOL(init_top_pgt)": "ffffffff93210000", "NUMBER(phys_base)": "-123731968",
            "NUMBER(pgtable_l5_enabled)": "0"}


@pytest.mark.parametrize(
    "changes, expected",
    [
        pytest.param({}, (0x13210000 - 123731968, 4), id="kaslr-negative-phys-base"),
        pytest.param({"NUMBER(pgtable_l5_enabled)": "1"}, (0x13210000 - 123731968, 5), id="la57"),
        pytest.param({"NUMBER(pgtable_l5_enabled)": None}, (0x13210000 - 123731968, 4), id="pre-4.17-no-l5-key"),
        pytest.param({"SYMBOL(init_top_pgt)": None, "SYMBOL(swapper_pg_dir)": "ffffffff81c0a000",
                      "NUMBER(phys_base)": "0"}, (0x1C0A000, 4), id="swapper_pg_dir"),
        pytest.param({"SYMBOL(swapper_pg_dir)": "ffffffff00000000"}, (0x13210000 - 123731968, 4),
                     id="init_top_pgt-preferred"),
        pytest.param({"NUMBER(phys_base)": "16777216"}, (0x14210000, 4), id="positive-phys-base"),
        pytest.param({"SYMBOL(init_top_pgt)": "0xffffffff93210000"}, (0x13210000 - 123731968, 4), id="0x-prefix"),
    ],
)
def test_kernel_root_table(changes: dict[str, str | None], expected: tuple[int, int]) -> None:
    vci = {k: v for k, v in {**BASE_VCI, **changes}.items() if v is not None}
    assert kernel_root_from_vmcoreinfo(vci) == expected


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"SYMBOL(init_top_pgt)": None}, id="no-symbol"),
        pytest.param({"NUMBER(phys_base)": None}, id="no-phys-base"),
        pytest.param({"SYMBOL(init_top_pgt)": "ffffffff9321000g"}, id="symbol-not-hex"),
        pytest.param({"SYMBOL(init_top_pgt)": ""}, id="symbol-empty"),
        pytest.param({"SYMBOL(init_top_pgt)": "1ffffffff93210000"}, id="symbol-too-long"),
        pytest.param({"SYMBOL(init_top_pgt)": "ffff888000000000"}, id="symbol-not-in-kernel-image"),
        pytest.param({"SYMBOL(init_top_pgt)": "ffffffff93210008"}, id="root-not-page-aligned"),
        pytest.param({"NUMBER(phys_base)": "0x1000"}, id="phys-base-hex"),
        pytest.param({"NUMBER(phys_base)": "1_000"}, id="phys-base-underscore"),
        pytest.param({"NUMBER(phys_base)": " 12"}, id="phys-base-space"),
        pytest.param({"NUMBER(phys_base)": "-9" * 30}, id="phys-base-huge"),
        pytest.param({"NUMBER(phys_base)": str(1 << 60)}, id="root-beyond-52-bits"),
        pytest.param({"NUMBER(pgtable_l5_enabled)": "2"}, id="l5-garbage"),
        pytest.param({"NUMBER(pgtable_l5_enabled)": ""}, id="l5-empty"),
    ],
)
def test_kernel_root_garbage(changes: dict[str, str | None]) -> None:
    vci = {k: v for k, v in {**BASE_VCI, **changes}.items() if v is not None}
    with pytest.raises(FormatError):
        kernel_root_from_vmcoreinfo(vci)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(BASE_VCI) + ["SYMBOL(swapper_pg_dir)"]), st.text(max_size=24)))
def test_kernel_root_any_text(vci: dict[str, str]) -> None:
    try:
        root, levels = kernel_root_from_vmcoreinfo(vci)
    except FormatError:
        return
    assert root % KiB4 == 0 and root < 1 << 52 and levels in (4, 5)


def test_kernel_root_real_vmcoreinfo() -> None:
    """Debian 6.1 guest under QEMU 7.2, KASLR on (phys_base negative)."""
    info = parse_qemu_dump((DATA / "qemu72-onebyte-dump.elf").read_bytes())
    text = vmcoreinfo_text(parse_notes(info.notes))
    assert text is not None
    root, levels = kernel_root_from_vmcoreinfo(parse_vmcoreinfo(text))
    assert levels == 4
    assert root % KiB4 == 0 and 0 < root < 1 << 32
    assert root == 0xFFFFFFFF93210000 - 0xFFFFFFFF80000000 - 123731968 == 0xBC10000
