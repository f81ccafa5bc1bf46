"""x86-64 page-table walk: guest kernel page tables -> virtual/physical runs.

Layout walked (Intel SDM vol. 3A, "4-Level Paging and 5-Level Paging"; Linux
names in brackets)::

    CR3 -> PML5 [pgd]  (LA57 only)           linear address bits 56..48
        -> PML4 [pgd, or p4d under LA57]     bits 47..39
        -> PDPT [pud]   PS=1: 1 GiB page     bits 38..30
        -> PD   [pmd]   PS=1: 2 MiB page     bits 29..21
        -> PT   [pte]   4 KiB page           bits 20..12

    every table: 4 KiB, 512 little-endian u64 entries
    entry:  bit 0        P   present (clear: the rest is ignored)
            bit 7        PS  page size (PDPT and PD; in a PTE it is PAT,
                             in PML4/PML5 it is reserved)
            bits 12..51  physical address of the next table or 4 KiB page;
                         1 GiB / 2 MiB pages take bits 30..51 / 21..51
                         (bit 12 of a large-page entry is its PAT bit)
            bit 63       XD  (ignored, like every other flag)

Linear addresses are canonical: bits 63..48 (63..57 under LA57) copy bit 47
(56).  :func:`walk` reads the tables through a caller-supplied ``read_phys``
and returns the mappings as :class:`Run` objects, coalesced wherever both the
virtual and the physical side continue, in increasing virtual order.

The guest controls its page tables, so nothing in them is trusted:

* a table address outside ``[0, phys_limit)`` is not read (counted in
  :attr:`PageWalk.skipped`), nor is one whose read raises
  :class:`~vmcorefs.errors.GuestMemoryError`; a short read is zero-padded;
* one page-table page is expanded at most ``max_visits`` times (default 1):
  later references to it are counted in :attr:`PageWalk.shared` and not
  followed.  Sharing is legitimate -- Linux's ESPFIX area points 4 PUD entries
  at one PMD page and 512 PMD entries at one PTE page, KASAN points whole
  levels at its zero-shadow tables -- but every re-expansion only re-maps the
  same physical pages at another address, and without the bound a hostile
  table (all entries -> itself) costs 512**levels;
* at most ``max_tables`` tables are read and at most ``max_runs`` runs are
  returned.  Reaching either bound stops the walk: the runs found so far are
  returned with :attr:`PageWalk.truncated` set (no exception), so a caller
  can still serve what was found and report the rest as missing.

Work is therefore at most ``max_tables`` reads of 4 KiB and 512 entry visits
each; depth is bounded by ``levels``, so loops cannot recurse.
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import compress
from typing import NamedTuple

from vmcorefs.errors import FormatError, GuestMemoryError

#: ``(guest-physical address, length) -> bytes``.  May return fewer bytes
#: (the rest reads as zeros) or raise GuestMemoryError (the table is skipped).
ReadPhys = Callable[[int, int], bytes]

PAGE_SIZE = 4096
TABLE_SIZE = 4096
PTRS_PER_TABLE = 512
#: Entry bits (Linux ``_PAGE_PRESENT``, ``_PAGE_PSE``, ``PTE_PFN_MASK``).
PAGE_PRESENT = 1 << 0
PAGE_PSE = 1 << 7
PHYS_ADDR_MASK = 0x000F_FFFF_FFFF_F000

#: Linux x86-64 ``__START_KERNEL_map``: kernel image symbols live at
#: ``__START_KERNEL_map + (phys - phys_base)``.
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
#: Start of the kernel half of the canonical address space, by paging levels.
KERNEL_HALF = {4: 0xFFFF_8000_0000_0000, 5: 0xFF00_0000_0000_0000}

_U64 = 1 << 64
_TABLE = struct.Struct("<512Q")
_ZERO_TABLE = bytes(TABLE_SIZE)


class Run(NamedTuple):
    """``size`` bytes of kernel-virtual ``vaddr`` map guest-physical ``paddr``."""

    vaddr: int
    paddr: int
    size: int


@dataclass(frozen=True)
class PageWalk:
    """Result of :func:`walk`."""

    #: Coalesced mappings, sorted by ``vaddr``, non-overlapping in ``vaddr``.
    runs: list[Run]
    #: True when ``max_tables`` or ``max_runs`` stopped the walk early.
    truncated: bool
    #: Tables read (calls to ``read_phys``).
    tables_read: int
    #: Table references not followed: outside ``phys_limit``, unreadable, or
    #: a PML4/PML5 entry with the reserved PS bit set.
    skipped: int
    #: Table references not followed because that table was already
    #: expanded ``max_visits`` times.
    shared: int

    def translate(self, vaddr: int) -> int | None:
        """Guest-physical address of ``vaddr``, or None when it is unmapped."""
        i = bisect.bisect_right(self.runs, vaddr, key=_vaddr) - 1
        if i >= 0:
            run = self.runs[i]
            if vaddr < run.vaddr + run.size:
                return run.paddr + (vaddr - run.vaddr)
        return None


def _vaddr(run: Run) -> int:
    return run.vaddr


class _Stop(Exception):
    """A work bound was reached (internal to :func:`walk`)."""


def cr3_to_root(cr3: int) -> int:
    """Physical address of the top-level table from a CR3 value.

    Drops the PCID / PWT / PCD bits 0..11, the no-flush bit 63 and the LAM
    bits 61..62: what is left is the 4 KiB-aligned address in bits 12..51.
    """
    return cr3 & PHYS_ADDR_MASK


def walk(read_phys: ReadPhys, root: int, *, levels: int = 4, phys_limit: int,
         start: int | None = None, end: int = _U64, max_tables: int = 1 << 16,
         max_runs: int = 1 << 20, max_visits: int = 1) -> PageWalk:
    """Walk the page tables at ``root`` and return the mappings of ``[start, end)``.

    ``root`` is the physical address of the PML4 (``levels=4``) or PML5
    (``levels=5``), e.g. ``cr3_to_root(cr3)``.  ``start`` defaults to the
    kernel half for ``levels`` (:data:`KERNEL_HALF`); ``start`` and ``end``
    are canonical addresses, 4 KiB-aligned (``end`` may be 2**64).  Bounds
    and hostile-input behaviour are described in the module docstring.
    Raises ValueError for bad arguments (never for bad tables).
    """
    if levels not in KERNEL_HALF:
        raise ValueError(f"levels must be 4 or 5, not {levels}")
    if start is None:
        start = KERNEL_HALF[levels]
    if not 0 <= start <= end <= _U64 or (start | end) % PAGE_SIZE:
        raise ValueError(f"bad range [{start:#x}, {end:#x}): need 0 <= start <= end <= 2**64, page-aligned")
    if root & ~PHYS_ADDR_MASK:
        raise ValueError(f"root {root:#x} is not a page-aligned physical address (use cr3_to_root)")
    w = _Walker(read_phys, levels, phys_limit, start, end, max_tables, max_runs, max_visits)
    truncated = False
    try:
        if start < end:
            w.top(root)
        w.flush()
    except _Stop:
        truncated = True
        if w.nv != w.cv and len(w.runs) < max_runs:
            w.flush()
    return PageWalk(w.runs, truncated, w.tables_read, w.skipped, w.shared)


class _Walker:
    """State of one walk: bounds, counters and the run being coalesced."""

    def __init__(self, read_phys: ReadPhys, levels: int, phys_limit: int, start: int,
                 end: int, max_tables: int, max_runs: int, max_visits: int) -> None:
        self.read_phys = read_phys
        self.levels = levels
        self.phys_limit = phys_limit
        self.start = start
        self.end = end
        self.max_tables = max_tables
        self.max_runs = max_runs
        self.max_visits = max_visits
        self.runs: list[Run] = []
        self.visits: dict[int, int] = {}
        self.tables_read = self.skipped = self.shared = 0
        # Run being coalesced: [cv, nv) virtual maps [cp, np) physical;
        # empty when nv == cv (-1 at first, which no address can follow).
        self.cv = self.cp = self.nv = self.np = -1

    def table(self, addr: int) -> tuple[int, ...]:
        """The entries of the table at ``addr``; () when not to be followed."""
        if addr + TABLE_SIZE > self.phys_limit:
            self.skipped += 1
            return ()
        visits = self.visits.get(addr, 0)
        if visits >= self.max_visits:
            self.shared += 1
            return ()
        if self.tables_read >= self.max_tables:
            raise _Stop
        self.tables_read += 1
        self.visits[addr] = visits + 1
        try:
            data = self.read_phys(addr, TABLE_SIZE)
        except GuestMemoryError:
            self.skipped += 1
            return ()
        if len(data) < TABLE_SIZE:
            data = bytes(data).ljust(TABLE_SIZE, b"\0")
        if data[:TABLE_SIZE] == _ZERO_TABLE:
            return ()
        return _TABLE.unpack_from(data)

    def flush(self) -> None:
        """Emit the run being coalesced, if any."""
        if self.nv != self.cv:
            if len(self.runs) >= self.max_runs:
                self.cv = self.nv = -1
                raise _Stop
            self.runs.append(Run(self.cv, self.cp, self.nv - self.cv))
            self.cv = self.nv = -1

    def leaf(self, va: int, pa: int, size: int) -> None:
        """Add a large page, clipped to [start, end), to the current run."""
        if va < self.start:
            cut = self.start - va
            va, pa, size = va + cut, pa + cut, size - cut
        if va + size > self.end:
            size = self.end - va
        if va == self.nv and pa == self.np:
            self.nv += size
            self.np += size
        else:
            self.flush()
            self.cv, self.cp, self.nv, self.np = va, pa, va + size, pa + size

    def top(self, root: int) -> None:
        """The PML4/PML5: each entry's canonical range is checked on its own."""
        ents = self.table(root)
        if not ents:
            return
        level = self.levels
        shift = 12 + 9 * (level - 1)
        bits = shift + 9
        half = 1 << (bits - 1)
        upper = _U64 - (1 << bits)  # added to sign-extend the upper half
        span = 1 << shift
        for i in compress(range(PTRS_PER_TABLE), ents):
            e = ents[i]
            if not e & PAGE_PRESENT:
                continue
            va = i << shift
            if va >= half:
                va += upper
            if va + span <= self.start or va >= self.end:
                continue
            if e & PAGE_PSE:  # reserved in a PML4E/PML5E: the CPU would fault
                self.skipped += 1
                continue
            self.descend(e & PHYS_ADDR_MASK, level - 1, va)

    def descend(self, addr: int, level: int, va_base: int) -> None:
        """A table below the top, mapping ``va_base`` + 512 entries of its span."""
        if level == 1:
            self.pte_table(addr, va_base)
            return
        ents = self.table(addr)
        if not ents:
            return
        shift = 12 + 9 * (level - 1)
        span = 1 << shift
        lo = (self.start - va_base) >> shift if self.start > va_base else 0
        hi = min(PTRS_PER_TABLE, (self.end - va_base + span - 1) >> shift)
        for i in compress(range(lo, hi), ents[lo:hi]):
            e = ents[i]
            if not e & PAGE_PRESENT:
                continue
            va = va_base + (i << shift)
            if e & PAGE_PSE:
                if level > 3:  # PML4E under LA57: reserved
                    self.skipped += 1
                    continue
                self.leaf(va, e & PHYS_ADDR_MASK & -span, span)
            else:
                self.descend(e & PHYS_ADDR_MASK, level - 1, va)

    def pte_table(self, addr: int, va_base: int) -> None:
        """A PT: the hot loop, coalescing 4 KiB pages in local variables."""
        ents = self.table(addr)
        if not ents:
            return
        start, end = self.start, self.end
        lo = (start - va_base) >> 12 if start > va_base else 0
        hi = min(PTRS_PER_TABLE, (end - va_base) >> 12)
        cv, cp, nv, np_ = self.cv, self.cp, self.nv, self.np
        runs, max_runs = self.runs, self.max_runs
        mask = PHYS_ADDR_MASK
        for i in compress(range(lo, hi), ents[lo:hi] if lo or hi < PTRS_PER_TABLE else ents):
            e = ents[i]
            if not e & 1:
                continue
            va = va_base + (i << 12)
            pa = e & mask
            if va == nv and pa == np_:
                nv += 4096
                np_ += 4096
                continue
            if nv != cv:
                if len(runs) >= max_runs:
                    self.cv = self.nv = -1
                    raise _Stop
                runs.append(Run(cv, cp, nv - cv))
            cv, cp, nv, np_ = va, pa, va + 4096, pa + 4096
        self.cv, self.cp, self.nv, self.np = cv, cp, nv, np_


def clip_runs(runs: Iterable[Run], ram: Iterable[tuple[int, int]]) -> list[Run]:
    """The parts of ``runs`` whose physical side lies in ``ram`` blocks.

    ``ram`` is ``(gpa, size)`` blocks (overlaps and adjacency allowed; they
    are merged first).  Page tables also map MMIO (ioremap) and addresses
    beyond RAM; a kcore keeps only what reads back as guest memory.  Output
    keeps the order of ``runs``; a run crossing a hole splits in two.
    """
    merged: list[list[int]] = []
    for gpa, size in sorted(ram):
        if size <= 0:
            continue
        if merged and gpa <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], gpa + size)
        else:
            merged.append([gpa, gpa + size])
    starts = [b[0] for b in merged]
    out: list[Run] = []
    for run in runs:
        pend = run.paddr + run.size
        i = max(bisect.bisect_right(starts, run.paddr) - 1, 0)
        while i < len(merged) and merged[i][0] < pend:
            lo, hi = max(merged[i][0], run.paddr), min(merged[i][1], pend)
            if lo < hi:
                out.append(Run(run.vaddr + (lo - run.paddr), lo, hi - lo))
            i += 1
    return out


_HEX = re.compile(r"(?:0x)?([0-9a-fA-F]{1,16})")
_DEC = re.compile(r"-?[0-9]{1,20}")


def kernel_root_from_vmcoreinfo(vmcoreinfo: Mapping[str, str]) -> tuple[int, int]:
    """``(physical address of the kernel's top-level table, paging levels)``.

    Uses the x86-64 keys of Linux's ``arch_crash_save_vmcoreinfo``:
    ``SYMBOL(init_top_pgt)`` (``SYMBOL(swapper_pg_dir)`` on kernels without
    it), a kernel-image address translated as ``__pa_symbol`` does::

        phys = vaddr - __START_KERNEL_map + phys_base     (mod 2**64)

    with ``NUMBER(phys_base)`` a signed decimal (negative under KASLR), and
    ``NUMBER(pgtable_l5_enabled)`` ``1`` for 5-level paging (``0`` or absent,
    as on kernels before 4.17: 4 levels).  Raises FormatError when a key is
    missing or garbled or the result is not a page-aligned physical address.
    """
    for key in ("SYMBOL(init_top_pgt)", "SYMBOL(swapper_pg_dir)"):
        if key in vmcoreinfo:
            sym_key = key
            break
    else:
        raise FormatError("VMCOREINFO has neither SYMBOL(init_top_pgt) nor SYMBOL(swapper_pg_dir)")
    m = _HEX.fullmatch(vmcoreinfo[sym_key])
    if not m:
        raise FormatError(f"VMCOREINFO {sym_key}={vmcoreinfo[sym_key][:40]!r} is not a hex address")
    vaddr = int(m.group(1), 16)
    if vaddr < START_KERNEL_MAP:
        raise FormatError(f"VMCOREINFO {sym_key}={vaddr:#x} is not in the kernel image mapping")
    raw_base = vmcoreinfo.get("NUMBER(phys_base)")
    if raw_base is None:
        raise FormatError("VMCOREINFO has no NUMBER(phys_base)")
    if not _DEC.fullmatch(raw_base):
        raise FormatError(f"VMCOREINFO NUMBER(phys_base)={raw_base[:40]!r} is not a decimal number")
    phys = (vaddr - START_KERNEL_MAP + int(raw_base)) % _U64
    if phys & ~PHYS_ADDR_MASK:
        raise FormatError(f"VMCOREINFO gives page-table root {phys:#x}: not a page-aligned physical address")
    l5 = vmcoreinfo.get("NUMBER(pgtable_l5_enabled)", "0")
    if l5 not in ("0", "1"):
        raise FormatError(f"VMCOREINFO NUMBER(pgtable_l5_enabled)={l5[:40]!r} is neither 0 nor 1")
    return phys, 5 if l5 == "1" else 4
