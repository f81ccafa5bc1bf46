"""arm64 page-table walk (paging_arm64: walk, levels_for, kernel_root_from_vmcoreinfo) on synthetic tables."""

from __future__ import annotations

import io
import random
import struct

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paging_support import GiB1, KiB4, MiB2, PhysMem, clip, coalesce

from vmcorefs.core.elf import DumpInfo
from vmcorefs.core.kcore import EM_AARCH64, PageTableRoot, kernel_view, page_table_root
from vmcorefs.core.notes import parse_vmcoreinfo
from vmcorefs.core.paging import PageWalk, Run
from vmcorefs.core.paging_arm64 import (
    OA_MASK,
    OA_MASK_LPA2,
    kernel_half,
    kernel_root_from_vmcoreinfo,
    levels_for,
    va_bits_from_vmcoreinfo,
    walk,
)
from vmcorefs.errors import FormatError

U64 = 1 << 64
#: Linux arm64 (6.1, 48-bit VA, 4 KiB pages) regions.
PAGE_OFFSET = 0xFFFF_0000_0000_0000
KIMAGE = 0xFFFF_8000_0800_0000
VMEMMAP = 0xFFFF_FC00_0000_0000
#: Attribute bits of Linux's PROT_NORMAL pages / blocks (AF, inner shareable,
#: attr index, PXN/UXN) and of table descriptors (none): ignored by the walker.
PAGE_ATTRS = (1 << 10) | (3 << 8) | (4 << 2) | (3 << 53)
GiB512 = 1 << 39


class Arm64Tables:
    """TTBR1 tables for ``va_bits`` (4 KiB granule) in a :class:`PhysMem`;
    ``lpa2``: DS=1 descriptors (output address bits 51..50 in bits 9..8)."""

    def __init__(self, mem: PhysMem, va_bits: int = 48, lpa2: bool = False, table_base: int = 0x4010_0000) -> None:
        self.mem = mem
        self.va_bits = va_bits
        self.levels = levels_for(va_bits)
        self.lpa2 = lpa2
        self.next_table = table_base
        self.root = self.alloc()
        self.mapped: list[Run] = []

    def alloc(self) -> int:
        addr = self.next_table
        self.next_table += KiB4
        self.mem.page(addr)
        return addr

    def encode(self, pa: int) -> int:
        if self.lpa2:
            return (pa & OA_MASK_LPA2) | ((pa >> 50) & 3) << 8
        return pa & OA_MASK

    def decode(self, desc: int) -> int:
        if self.lpa2:
            return (desc & OA_MASK_LPA2) | ((desc >> 8) & 3) << 50
        return desc & OA_MASK

    def index(self, va: int, level: int) -> int:
        return ((va - kernel_half(self.va_bits)) >> (12 + 9 * (level - 1))) & 511

    def map(self, va: int, pa: int, size: int, attrs: int = PAGE_ATTRS) -> bool:
        """Map one page or block; False (nothing mapped) if it collides."""
        assert va >= kernel_half(self.va_bits) and va % size == 0 and pa % size == 0
        leaf = {KiB4: 1, MiB2: 2, GiB1: 3, GiB512: 4}[size]
        table = self.root
        for level in range(self.levels, leaf, -1):
            slot = table + 8 * self.index(va, level)
            e = self.mem.get(slot)
            if e & 1:
                if not e & 2:
                    return False  # a block covers it
                table = self.decode(e)
            else:
                new = self.alloc()
                self.mem.set(slot, self.encode(new) | 3)
                table = new
        slot = table + 8 * self.index(va, leaf)
        if self.mem.get(slot) & 1:
            return False
        if not self.lpa2:
            attrs |= 3 << 8  # SH: inner shareable (DS=0 only)
        else:
            attrs &= ~(3 << 8)
        self.mem.set(slot, self.encode(pa) | attrs | (3 if leaf == 1 else 1))
        self.mapped.append(Run(va, pa, size))
        return True

    def map_4k_range(self, va: int, pa: int, size: int) -> None:
        """Map ``size`` bytes of 4 KiB pages; whole tables at once."""
        end = va + size
        while va < end:
            assert self.map(va, pa, KiB4)
            table = self.decode_table_of(va)
            first = self.index(va, 1)
            n = min(512 - first, (end - va) // KiB4)
            struct.pack_into(f"<{n}Q", self.mem.page(table), first * 8,
                             *(self.encode(p) | PAGE_ATTRS | (3 << 8) | 3 for p in range(pa, pa + n * KiB4, KiB4)))
            self.mapped[-1] = Run(va, pa, n * KiB4)
            va += n * KiB4
            pa += n * KiB4

    def decode_table_of(self, va: int) -> int:
        table = self.root
        for level in range(self.levels, 1, -1):
            table = self.decode(self.mem.get(table + 8 * self.index(va, level)))
        return table


def do_walk(t: Arm64Tables, **kw: int) -> PageWalk:
    kw.setdefault("phys_limit", t.mem.limit)
    return walk(t.mem.read, t.root, va_bits=t.va_bits, **kw)


def naive_translate(t: Arm64Tables, va: int) -> int | None:
    """Oracle: the MMU's walk of one address (no bounds, no coalescing)."""
    table, entries_bits = t.root, t.va_bits - 12 - 9 * (t.levels - 1)
    for level in range(t.levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        i = ((va - kernel_half(t.va_bits)) >> shift) & ((1 << entries_bits) - 1)
        entries_bits = 9
        if table + KiB4 > t.mem.limit:
            return None
        d = int(struct.unpack_from("<Q", t.mem.read(table, KiB4), 8 * i)[0])
        if not d & 1:
            return None
        if d & 2 and level > 1:
            table = t.decode(d)
            continue
        if level == 1 and not d & 2:
            return None
        if not d & 2 and not (1 < level <= 3 or (level == 4 and t.lpa2)):
            return None
        return (t.decode(d) & -(1 << shift)) + (va & ((1 << shift) - 1))
    return None


# --- levels, arguments -----------------------------------------------------------


@pytest.mark.parametrize("va_bits, levels", [(25, 2), (36, 3), (39, 3), (42, 4), (47, 4), (48, 4), (52, 5)])
def test_levels_for(va_bits: int, levels: int) -> None:
    assert levels_for(va_bits) == levels


def test_bad_arguments() -> None:
    mem = PhysMem()
    with pytest.raises(ValueError):
        walk(mem.read, 0x4000_0000, va_bits=53, phys_limit=mem.limit)
    with pytest.raises(ValueError):
        walk(mem.read, 0x4000_0000, va_bits=24, phys_limit=mem.limit)
    with pytest.raises(ValueError):
        walk(mem.read, 0x4000_0000, va_bits=52, lpa2=False, phys_limit=mem.limit)
    with pytest.raises(ValueError):
        walk(mem.read, 0x4000_0800, phys_limit=mem.limit)
    with pytest.raises(ValueError):
        walk(mem.read, 0x4000_0000, start=PAGE_OFFSET + 1, phys_limit=mem.limit)
    with pytest.raises(ValueError):
        walk(mem.read, 0x4000_0000, start=PAGE_OFFSET + KiB4, end=PAGE_OFFSET, phys_limit=mem.limit)


# --- layouts ---------------------------------------------------------------------


@pytest.mark.parametrize("va_bits, lpa2", [(48, False), (39, False), (52, True)])
def test_pages_blocks_and_coalescing(va_bits: int, lpa2: bool) -> None:
    t = Arm64Tables(PhysMem(1 << 52 if lpa2 else 1 << 40), va_bits, lpa2)
    base = kernel_half(va_bits)
    assert t.map(base, 0x4000_0000, GiB1)                      # linear map: a 1 GiB block
    assert t.map(base + GiB1, 0x8000_0000, MiB2)               # continues it: one run
    assert t.map(base + 4 * GiB1, 0x4020_0000, KiB4)
    assert t.map(base + 4 * GiB1 + KiB4, 0x4020_1000, KiB4)    # contiguous page: same run
    assert t.map(base + 4 * GiB1 + 3 * KiB4, 0x4020_5000, KiB4)
    w = do_walk(t)
    assert w.runs == [Run(base, 0x4000_0000, GiB1 + MiB2), Run(base + 4 * GiB1, 0x4020_0000, 2 * KiB4),
                      Run(base + 4 * GiB1 + 3 * KiB4, 0x4020_5000, KiB4)]
    assert not w.truncated and w.skipped == 0
    assert w.translate(base + GiB1 + 5) == 0x8000_0005
    assert w.translate(base + 4 * GiB1 + 2 * KiB4) is None


def test_lpa2_output_address_bits_51_50() -> None:
    """Under DS=1 a page at PA >= 2**50 has OA[51:50] in descriptor bits 9..8."""
    t = Arm64Tables(PhysMem(1 << 52), 52, lpa2=True)
    va = kernel_half(52) + 3 * (1 << 48)  # top-level index 3 of 16
    assert t.map(va, (3 << 50) | 0x1234_5000, KiB4)
    assert do_walk(t).runs == [Run(va, (3 << 50) | 0x1234_5000, KiB4)]


def test_lpa2_level0_block() -> None:
    t = Arm64Tables(PhysMem(1 << 52), 52, lpa2=True)
    va = kernel_half(52) + GiB512
    assert t.map(va, 2 * GiB512, GiB512)
    assert do_walk(t).runs == [Run(va, 2 * GiB512, GiB512)]


def test_ds0_ignores_upper_attributes_and_sh_bits() -> None:
    """DS=0: bits 50 (GP), 51 (DBM), 52 (contiguous), 53..54 (PXN/UXN), 9..8
    (SH) and the software bits are not address bits."""
    t = Arm64Tables(PhysMem(), 48)
    va = KIMAGE
    assert t.map(va, 0x4021_0000, KiB4, attrs=PAGE_ATTRS | (0xF << 50) | (0xF << 55) | (1 << 11))
    assert do_walk(t).runs == [Run(va, 0x4021_0000, KiB4)]


def test_reserved_descriptors_are_skipped() -> None:
    """0b01 at L3, at L0 without DS=1 and at L-1 is reserved (the MMU faults)."""
    mem = PhysMem(1 << 40)
    t = Arm64Tables(mem, 48)
    assert t.map(PAGE_OFFSET, 0x4000_0000, KiB4)
    table = t.decode_table_of(PAGE_OFFSET)
    mem.set(table + 8, 0x4000_1000 | PAGE_ATTRS | 1)       # L3 "block"
    mem.set(t.root + 8 * 5, 0x4000_0000 | PAGE_ATTRS | 1)  # L0 block, DS=0
    w = do_walk(t)
    assert w.runs == [Run(PAGE_OFFSET, 0x4000_0000, KiB4)]
    assert w.skipped == 2
    t5 = Arm64Tables(PhysMem(1 << 52), 52, lpa2=True)
    t5.mem.set(t5.root, 0x4000_0000 | 1)                   # L-1 block
    assert do_walk(t5).runs == [] and do_walk(t5).skipped == 1


def test_invalid_descriptors_and_af_clear() -> None:
    mem = PhysMem()
    t = Arm64Tables(mem, 48)
    assert t.map(PAGE_OFFSET, 0x4000_0000, KiB4, attrs=0)  # AF clear: still a translation
    table = t.decode_table_of(PAGE_OFFSET)
    mem.set(table + 8, 0x4000_1000 | PAGE_ATTRS | 2)       # bit 0 clear: invalid
    assert do_walk(t).runs == [Run(PAGE_OFFSET, 0x4000_0000, KiB4)]


def test_linux_like_kernel_half() -> None:
    """512 MiB of RAM from 1 GiB mapped page by page (rodata=full), the
    kernel image, vmemmap: three runs, few tables."""
    t = Arm64Tables(PhysMem(1 << 31), 48, table_base=0x7000_0000)
    t.map_4k_range(PAGE_OFFSET, 0x4000_0000, 512 << 20)
    t.map_4k_range(KIMAGE + 0x21_0000, 0x4021_0000, 0x137_0000)
    assert t.map(VMEMMAP + MiB2 * 16, 0x5FE0_0000, MiB2)
    w = do_walk(t)
    assert w.runs == [Run(PAGE_OFFSET, 0x4000_0000, 512 << 20), Run(KIMAGE + 0x21_0000, 0x4021_0000, 0x137_0000),
                      Run(VMEMMAP + MiB2 * 16, 0x5FE0_0000, MiB2)]
    assert w.runs == coalesce(t.mapped)
    assert w.tables_read < 300


def test_range_is_clipped() -> None:
    t = Arm64Tables(PhysMem(1 << 40), 48)
    assert t.map(PAGE_OFFSET, 0x4000_0000, GiB1)
    w = do_walk(t, start=PAGE_OFFSET + MiB2, end=PAGE_OFFSET + 2 * MiB2 + KiB4)
    assert w.runs == [Run(PAGE_OFFSET + MiB2, 0x4020_0000, MiB2 + KiB4)]
    # Below the kernel half: TTBR1 does not translate it, the walk starts at the half.
    assert do_walk(t, start=0, end=PAGE_OFFSET + KiB4).runs == [Run(PAGE_OFFSET, 0x4000_0000, KiB4)]
    assert do_walk(t, start=0, end=PAGE_OFFSET).runs == []


# --- hostile tables ----------------------------------------------------------------


def test_table_pointing_to_itself() -> None:
    """A root whose every entry points at itself: each table expanded once."""
    mem = PhysMem()
    root = 0x4000_0000
    struct.pack_into("<512Q", mem.page(root), 0, *([root | 3] * 512))
    w = walk(mem.read, root, phys_limit=mem.limit)
    assert w.runs == [] and w.tables_read == 1 and w.shared == 512
    w2 = walk(mem.read, root, phys_limit=mem.limit, max_visits=2)
    assert (w2.runs, w2.tables_read, w2.shared, w2.truncated) == ([], 2, 512 + 511, False)
    # Read as L3 at the fourth visit: its 512 descriptors are pages of the table itself.
    w4 = walk(mem.read, root, phys_limit=mem.limit, max_visits=4)
    assert w4.runs[:2] == [Run(PAGE_OFFSET, root, KiB4), Run(PAGE_OFFSET + KiB4, root, KiB4)]
    assert len(w4.runs) == 512 and w4.tables_read == 4


def test_fan_out_is_bounded() -> None:
    """Tables whose entries all point at the next table: max_visits lets each
    be re-expanded, max_tables stops the walk with truncated set."""
    mem = PhysMem()
    tables = [0x4000_0000 + i * KiB4 for i in range(4)]
    for i, addr in enumerate(tables[:-1]):
        struct.pack_into("<512Q", mem.page(addr), 0, *([tables[i + 1] | 3] * 512))
    struct.pack_into("<512Q", mem.page(tables[-1]), 0, *(0x5000_0000 + j * KiB4 | 3 | PAGE_ATTRS for j in range(512)))
    w = walk(mem.read, tables[0], phys_limit=mem.limit, max_visits=1 << 30, max_tables=1000)
    assert w.truncated and w.tables_read <= 1000
    w = walk(mem.read, tables[0], phys_limit=mem.limit, max_visits=1 << 30, max_runs=10)
    assert w.truncated and len(w.runs) == 10


def test_tables_beyond_phys_limit_unreadable_and_short() -> None:
    mem = PhysMem(1 << 32)
    t = Arm64Tables(mem, 48)
    for i in range(4):
        assert t.map(PAGE_OFFSET + i * GiB512, 0x4000_0000 + i * KiB4, KiB4)
    # L1 table of the second entry beyond phys_limit, third unreadable, fourth short.
    second = t.root + 8
    mem.set(second, (1 << 33) | 3)
    third = t.decode(mem.get(t.root + 16))
    mem.bad.add(third)
    fourth = t.decode(mem.get(t.root + 24))
    mem.short.add(fourth)
    w = do_walk(t)
    # The short table reads as its first 100 bytes, zero-padded: entry 0 is there.
    assert w.runs == [Run(PAGE_OFFSET, 0x4000_0000, KiB4), Run(PAGE_OFFSET + 3 * GiB512, 0x4000_3000, KiB4)]
    assert w.skipped == 2
    # root itself beyond the limit
    assert walk(mem.read, 1 << 33, phys_limit=mem.limit).runs == []


def test_other_read_errors_propagate() -> None:
    def read(addr: int, length: int) -> bytes:
        raise OSError("host failure")
    with pytest.raises(OSError):
        walk(read, 0x4000_0000, phys_limit=1 << 32)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from([48, 39, 52]))
def test_random_bytes_as_tables(seed: int, va_bits: int) -> None:
    """Any table contents: the walk ends, runs are in range and ordered."""
    rng = random.Random(seed)
    mem = PhysMem(1 << 24)
    for page in range(0, 1 << 24, KiB4 * 16):
        mem.page(page)[:] = rng.randbytes(KiB4)
    w = walk(mem.read, rng.randrange(0, 1 << 24, KiB4 * 16), va_bits=va_bits, phys_limit=mem.limit,
             max_tables=2000)
    prev = -1
    for r in w.runs:
        assert r.size > 0 and r.vaddr % KiB4 == 0 and r.size % KiB4 == 0 and r.paddr % KiB4 == 0
        assert kernel_half(va_bits) <= r.vaddr and r.vaddr + r.size <= U64 and r.vaddr >= prev
        prev = r.vaddr + r.size


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, bool, list[tuple[int, int, int]]]:
    va_bits, lpa2 = draw(st.sampled_from([(48, False), (39, False), (52, True)]))
    n = draw(st.integers(1, 25))
    maps = []
    for _ in range(n):
        size = draw(st.sampled_from([KiB4, KiB4, MiB2, GiB1]))
        va = kernel_half(va_bits) + draw(st.integers(0, (1 << va_bits) // size - 1)) * size
        pa = draw(st.integers(0, (1 << 40) // size - 1)) * size
        maps.append((va, pa, size))
    return va_bits, lpa2, maps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.data())
def test_walk_matches_mmu(layout: tuple[int, bool, list[tuple[int, int, int]]], data: st.DataObject) -> None:
    """Random mappings: the walk is the coalesced mapping list, its
    translate() agrees with a one-address MMU walk, and a sub-range is the clip."""
    va_bits, lpa2, maps = layout
    t = Arm64Tables(PhysMem(1 << 52), va_bits, lpa2, table_base=1 << 45)
    for va, pa, size in maps:
        t.map(va, pa, size)
    w = do_walk(t)
    assert w.runs == coalesce(t.mapped)
    for va, _, size in maps:
        for probe in (va, va + size - 1, va + size):
            if probe < U64:
                assert w.translate(probe) == naive_translate(t, probe)
    base = kernel_half(va_bits)
    start = base + data.draw(st.integers(0, (1 << va_bits) // KiB4 - 1)) * KiB4
    end = data.draw(st.integers(start // KiB4, U64 // KiB4)) * KiB4
    assert do_walk(t, start=start, end=end).runs == coalesce(clip(t.mapped, start, end))


# --- VMCOREINFO ----------------------------------------------------------------------

#: What Debian's 6.1 arm64 kernel published on QEMU's virt machine (the lines used).
REAL = """OSRELEASE=6.1.0-50-cloud-arm64
PAGESIZE=4096
SYMBOL(swapper_pg_dir)=ffffd7b9dbd7b000
SYMBOL(_stext)=ffffd7b9daa10000
NUMBER(VA_BITS)=48
NUMBER(kimage_voffset)=0xffffd7b99a800000
NUMBER(PHYS_OFFSET)=0x40000000
NUMBER(TCR_EL1_T1SZ)=0x10
KERNELOFFSET=57b9d2a00000
"""


def changed(change: dict[str, str | None]) -> dict[str, str]:
    """:data:`REAL` with keys replaced (a value) or removed (None)."""
    vci = parse_vmcoreinfo(REAL)
    for k, v in change.items():
        if v is None:
            del vci[k]
        else:
            vci[k] = v
    return vci


def test_kernel_root_real_vmcoreinfo() -> None:
    root, va_bits = kernel_root_from_vmcoreinfo(parse_vmcoreinfo(REAL))
    assert (root, va_bits) == (0xFFFFD7B9DBD7B000 - 0xFFFFD7B99A800000, 48)
    assert root == 0x4157_B000


@pytest.mark.parametrize("change, expected", [
    ({"NUMBER(TCR_EL1_T1SZ)": None}, 48),                       # before Linux 5.9: VA_BITS
    ({"NUMBER(TCR_EL1_T1SZ)": "0xc", "NUMBER(VA_BITS)": "52"}, 52),
    ({"NUMBER(TCR_EL1_T1SZ)": "0x10", "NUMBER(VA_BITS)": "52"}, 48),  # 52-bit kernel, 48-bit CPU
    ({"NUMBER(TCR_EL1_T1SZ)": "0x19", "NUMBER(VA_BITS)": "39",
      "SYMBOL(swapper_pg_dir)": "ffffffc0093b5000", "NUMBER(kimage_voffset)": "0xffffffbfc9000000"}, 39),
])
def test_va_bits(change: dict[str, str | None], expected: int) -> None:
    vci = changed(change)
    assert va_bits_from_vmcoreinfo(vci) == expected
    assert kernel_root_from_vmcoreinfo(vci)[1] == expected


@pytest.mark.parametrize("change", [
    {"SYMBOL(swapper_pg_dir)": None},
    {"NUMBER(kimage_voffset)": None},
    {"NUMBER(TCR_EL1_T1SZ)": None, "NUMBER(VA_BITS)": None},
    {"NUMBER(TCR_EL1_T1SZ)": "zz"},
    {"NUMBER(TCR_EL1_T1SZ)": None, "NUMBER(VA_BITS)": "0x30"},
    {"NUMBER(TCR_EL1_T1SZ)": "0x8"},                           # 56-bit: not a 4 KiB-granule size
    {"PAGESIZE": "65536"},
    {"SYMBOL(swapper_pg_dir)": "ffffd7b9dbd7b800"},            # not page-aligned
    {"SYMBOL(swapper_pg_dir)": "ffff7b9dbd7b000"},             # below the kernel half
    {"SYMBOL(swapper_pg_dir)": "ffffd7b9dbd7b000 junk"},
])
def test_kernel_root_garbage(change: dict[str, str | None]) -> None:
    vci = changed(change)
    with pytest.raises(FormatError):
        kernel_root_from_vmcoreinfo(vci)


@given(st.dictionaries(st.sampled_from(["SYMBOL(swapper_pg_dir)", "NUMBER(kimage_voffset)", "NUMBER(VA_BITS)",
                                        "NUMBER(TCR_EL1_T1SZ)", "PAGESIZE"]), st.text(max_size=30)))
def test_kernel_root_any_text(vci: dict[str, str]) -> None:
    """Any values: a page-aligned root below 2**52 or FormatError."""
    try:
        root, va_bits = kernel_root_from_vmcoreinfo(vci)
    except FormatError:
        return
    assert root % KiB4 == 0 and root < 1 << 52 and 25 <= va_bits <= 52



# --- kcore's dispatch on e_machine ------------------------------------------------------


def test_page_table_root_dispatch() -> None:
    """EM_AARCH64 takes the arm64 root from VMCOREINFO (QEMU's notes have no
    TTBR1); another machine than x86 and arm64 has no walker."""
    info = DumpInfo(b"\x7fELF", EM_AARCH64, 0, b"", True)
    root = page_table_root(parse_vmcoreinfo(REAL), info)
    assert root == PageTableRoot(EM_AARCH64, 0x4157_B000, 48)
    with pytest.raises(FormatError, match="TTBR1"):
        page_table_root(None, info)
    with pytest.raises(FormatError, match="machine 243"):
        page_table_root(parse_vmcoreinfo(REAL), DumpInfo(b"\x7fELF", 243, 0, b"", True))


def test_kernel_view_walks_arm64_tables() -> None:
    """kernel_view on an EM_AARCH64 dump walks TTBR1 tables (an x86 walk of
    the same tables would find other mappings) and clips to RAM."""
    mem = PhysMem(1 << 31)
    t = Arm64Tables(mem, 48, table_base=0x5000_0000)
    t.map_4k_range(PAGE_OFFSET, 0x4000_0000, 64 << 20)
    assert t.map(KIMAGE, 0x4020_0000, MiB2)
    assert t.map(KIMAGE + GiB1, 0x0900_0000, MiB2)  # MMIO: not RAM
    info = DumpInfo(b"\x7fELF", EM_AARCH64, 0, b"", True)
    view = kernel_view(mem.read, info, PageTableRoot(EM_AARCH64, t.root, 48), [(0x4000_0000, 1 << 30)])
    assert not view.truncated
    elf = ELFFile(io.BytesIO(view.file.prefix))
    assert elf["e_machine"] == "EM_AARCH64"
    loads = [(s["p_vaddr"], s["p_paddr"], s["p_memsz"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    assert loads == [(PAGE_OFFSET, 0x4000_0000, 64 << 20), (KIMAGE, 0x4020_0000, MiB2)]
