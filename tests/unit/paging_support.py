"""Synthetic x86-64 page tables in a sparse fake guest-physical memory."""

from __future__ import annotations

import struct

from vmcorefs.core.paging import PAGE_PRESENT, PAGE_PSE, PHYS_ADDR_MASK, Run
from vmcorefs.errors import GuestMemoryError

KiB4, MiB2, GiB1 = 1 << 12, 1 << 21, 1 << 30
LEAF_LEVEL = {KiB4: 1, MiB2: 2, GiB1: 3}
#: Linux's _KERNPG_TABLE (present, RW, accessed, dirty) for table entries.
TABLE_FLAGS = 0x63
U64 = struct.Struct("<Q")


class PhysMem:
    """Guest-physical memory below ``limit``: 4 KiB pages made on first write.

    ``read`` is a :data:`~vmcorefs.core.paging.ReadPhys`; it records every
    call and fails the test if the walker reads at or beyond ``limit``.
    Addresses in ``bad`` raise GuestMemoryError; in ``short`` return 100 bytes.
    """

    def __init__(self, limit: int = 1 << 32) -> None:
        self.limit = limit
        self.pages: dict[int, bytearray] = {}
        self.reads: list[int] = []
        self.bad: set[int] = set()
        self.short: set[int] = set()

    def read(self, addr: int, length: int) -> bytes:
        assert 0 <= addr and addr + length <= self.limit, f"read {addr:#x}+{length} beyond phys_limit"
        assert addr % KiB4 == 0 and length == KiB4
        self.reads.append(addr)
        if addr in self.bad:
            raise GuestMemoryError("fake unreadable page", addr)
        page = bytes(self.pages.get(addr, bytes(KiB4)))
        return page[:100] if addr in self.short else page

    def page(self, addr: int) -> bytearray:
        base = addr & ~(KiB4 - 1)
        if base not in self.pages:
            self.pages[base] = bytearray(KiB4)
        return self.pages[base]

    def get(self, addr: int) -> int:
        return int(U64.unpack_from(self.page(addr), addr % KiB4)[0])

    def set(self, addr: int, value: int) -> None:
        U64.pack_into(self.page(addr), addr % KiB4, value)


class PageTables:
    """x86-64 page tables with ``levels`` levels built in a :class:`PhysMem`.

    Tables are allocated upwards from ``table_base``.  ``map`` installs one
    page; ``mapped`` records every accepted page for oracles.
    """

    def __init__(self, mem: PhysMem, levels: int = 4, table_base: int = 0x100000) -> None:
        self.mem = mem
        self.levels = levels
        self.bits = 12 + 9 * levels
        self.next_table = table_base
        self.tables = 0
        self.root = self.alloc()
        self.mapped: list[Run] = []

    def alloc(self) -> int:
        addr = self.next_table
        self.next_table += KiB4
        self.tables += 1
        self.mem.page(addr)
        return addr

    def index(self, va: int, level: int) -> int:
        return (va >> (12 + 9 * (level - 1))) & 511

    def check_canonical(self, va: int) -> None:
        top = va >> (self.bits - 1)
        assert top in (0, (1 << (65 - self.bits)) - 1), f"{va:#x} is not canonical"

    def table_for(self, va: int, leaf_level: int) -> int | None:
        """The table holding ``va``'s entry at ``leaf_level``; None if a large page covers it."""
        table = self.root
        for level in range(self.levels, leaf_level, -1):
            slot = table + 8 * self.index(va, level)
            e = self.mem.get(slot)
            if e & PAGE_PRESENT:
                if level <= 3 and e & PAGE_PSE:
                    return None
                table = e & PHYS_ADDR_MASK
            else:
                new = self.alloc()
                self.mem.set(slot, new | TABLE_FLAGS)
                table = new
        return table

    def map(self, va: int, pa: int, size: int, flags: int = 0x63) -> bool:
        """Map one page; False (nothing mapped) if it collides with a mapping."""
        self.check_canonical(va)
        assert va % size == 0 and pa % size == 0 and pa < 1 << 52
        level = LEAF_LEVEL[size]
        table = self.table_for(va, level)
        if table is None:
            return False
        slot = table + 8 * self.index(va, level)
        if self.mem.get(slot) & PAGE_PRESENT:
            return False
        self.mem.set(slot, pa | flags | PAGE_PRESENT | (PAGE_PSE if level > 1 else 0))
        self.mapped.append(Run(va, pa, size))
        return True

    def map_4k_range(self, va: int, pa: int, size: int, flags: int = 0x163) -> None:
        """Map ``size`` bytes of 4 KiB pages fast (whole PTs at once); no collisions allowed."""
        assert va % KiB4 == 0 and pa % KiB4 == 0 and size % KiB4 == 0
        end = va + size
        while va < end:
            table = self.table_for(va, 1)
            assert table is not None
            first = self.index(va, 1)
            n = min(512 - first, (end - va) // KiB4)
            struct.pack_into(f"<{n}Q", self.mem.page(table), first * 8,
                             *range(pa | flags | PAGE_PRESENT, pa + n * KiB4, KiB4))
            self.mapped.append(Run(va, pa, n * KiB4))
            va += n * KiB4
            pa += n * KiB4


def coalesce(pages: list[Run]) -> list[Run]:
    """Oracle: sort mappings by vaddr and merge where both sides continue."""
    out: list[Run] = []
    for r in sorted(pages):
        if out and out[-1].vaddr + out[-1].size == r.vaddr and out[-1].paddr + out[-1].size == r.paddr:
            out[-1] = Run(out[-1].vaddr, out[-1].paddr, out[-1].size + r.size)
        else:
            out.append(r)
    return out


def clip(runs: list[Run], start: int, end: int) -> list[Run]:
    """Oracle: ``runs`` restricted to virtual ``[start, end)``."""
    out = []
    for r in runs:
        lo, hi = max(r.vaddr, start), min(r.vaddr + r.size, end)
        if lo < hi:
            out.append(Run(lo, r.paddr + (lo - r.vaddr), hi - lo))
    return out


def naive_walk(mem: PhysMem, root: int, levels: int, phys_limit: int, start: int, end: int,
               max_visits: int = 1) -> tuple[list[Run], int, int]:
    """Oracle for :func:`~vmcorefs.core.paging.walk`: entry by entry, no bounds.

    Returns (leaf pages clipped to [start, end) in walk order, skipped, shared).
    """
    bits = 12 + 9 * levels
    visits: dict[int, int] = {}
    out: list[Run] = []
    counts = {"skipped": 0, "shared": 0}

    def canonical(va: int) -> int:
        return va | (1 << 64) - (1 << bits) if va >> (bits - 1) else va

    def table(addr: int, level: int, va_base: int) -> None:
        if addr + KiB4 > phys_limit:
            counts["skipped"] += 1
            return
        if visits.get(addr, 0) >= max_visits:
            counts["shared"] += 1
            return
        visits[addr] = visits.get(addr, 0) + 1
        data = bytes(mem.pages.get(addr, bytes(KiB4)))
        shift = 12 + 9 * (level - 1)
        for i in range(512):
            e = int(U64.unpack_from(data, 8 * i)[0])
            lo, hi = canonical(va_base + (i << shift)), canonical(va_base + (i << shift)) + (1 << shift)
            if not e & PAGE_PRESENT or hi <= start or lo >= end:
                continue
            if level == 1 or (level <= 3 and e & PAGE_PSE):
                pa = e & PHYS_ADDR_MASK & ~((1 << shift) - 1)
                clo, chi = max(lo, start), min(hi, end)
                out.append(Run(clo, pa + (clo - lo), chi - clo))
            elif e & PAGE_PSE:
                counts["skipped"] += 1
            else:
                table(e & PHYS_ADDR_MASK, level - 1, va_base + (i << shift))

    if start < end:
        table(root, levels, 0)
    return out, counts["skipped"], counts["shared"]
