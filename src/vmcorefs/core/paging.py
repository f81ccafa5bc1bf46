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
  a PML4E/PML5E with the reserved PS bit (the CPU would fault) is skipped;
* one page-table page is expanded at most ``max_visits`` times (default 1):
  later references to it are counted in :attr:`PageWalk.shared` and not
  followed.  Sharing is legitimate -- Linux's ESPFIX area points 4 PUD entries
  at one PMD page and 512 PMD entries at one PTE page (65536 aliases of each
  stack page), KASAN points whole levels at its zero-shadow tables -- but a
  re-expansion only maps the same physical pages again at another address,
  and without the bound a table whose entries all point to itself costs
  512**levels;
* at most ``max_tables`` table references are handled (each one read, or
  refused as above) and at most ``max_runs`` runs are returned.  Reaching
  either bound stops the walk: the runs found so far are returned with
  :attr:`PageWalk.truncated` set (no exception), so a caller can serve what
  was found and say that the rest is missing.  Depth is bounded by
  ``levels``, so loops cannot recurse.

Cost: each table read is handled as one 32768-bit integer (see
:func:`_leaf_runs`), so a table costs tens of microseconds plus about 2 us
per run it produces, whatever its entries; the walk is bounded by
``max_tables`` tables and ``max_runs`` runs (about 2.5 s and 2 s of CPython
at the defaults, and ~160 MB for 2**20 runs).  A 512 MiB guest's kernel half
mapped with 4 KiB pages walks in about 20 ms.
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from vmcorefs.core.layout import PAGE_SIZE
from vmcorefs.errors import FormatError, GuestMemoryError

#: ``(guest-physical address, length) -> bytes``.  May return fewer bytes
#: (the rest reads as zeros) or raise GuestMemoryError (the table is skipped).
ReadPhys = Callable[[int, int], bytes]

TABLE_SIZE = 4096
PTRS_PER_TABLE = 512
#: Entry bits (Linux ``_PAGE_PRESENT``, ``_PAGE_PSE``, ``PTE_PFN_MASK``).
PAGE_PRESENT = 1 << 0
PAGE_PSE = 1 << 7
PHYS_ADDR_MASK = 0x000F_FFFF_FFFF_F000
#: CR4.LA57: 5-level paging.
CR4_LA57 = 1 << 12

#: Linux x86-64 ``__START_KERNEL_map``: kernel image symbols live at
#: ``__START_KERNEL_map + (phys - phys_base)``.
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
#: Start of the kernel half of the canonical address space, by paging levels.
KERNEL_HALF = {4: 0xFFFF_8000_0000_0000, 5: 0xFF00_0000_0000_0000}

_U64 = 1 << 64
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


class WalkStopped(Exception):
    """A work bound was reached (internal to the walkers: :meth:`TableWalker.result`)."""


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
    are canonical addresses, 4 KiB-aligned (``end`` may be 2**64), and may
    fall in the non-canonical hole.  Bounds and hostile-input behaviour are
    described in the module docstring.  Raises ValueError for bad arguments
    (never for bad tables).
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
    return w.result(lambda: w.expand(root, levels, 0) if w.start < w.end else None)


# A table is handled as one 32768-bit little-endian integer: 512 lanes of 64
# bits, lane i = entry i.  Masks with a bit set in every lane select a field
# of all entries at once; as no lane arithmetic below carries out of its
# lane, one big-integer operation does the work of a loop over 512 entries.
_LANES = (1 << (64 * PTRS_PER_TABLE)) - 1
_BIT0 = _LANES // ((1 << 64) - 1)           # bit 0 of every lane
_BIT63 = _BIT0 << 63
_BELOW63 = _BIT0 * ((1 << 63) - 1)          # bits 0..62 of every lane
#: Address field of a leaf, in every lane, by level (bit 12 of a large page is PAT).
_LEAF_ADDR = {level: _BIT0 * (PHYS_ADDR_MASK & -(1 << (12 + 9 * (level - 1)))) for level in (1, 2, 3)}


def _lanes(lo: int, hi: int) -> int:
    """Bit 0 of lanes ``lo`` to ``hi - 1``."""
    return ((1 << (64 * hi)) - (1 << (64 * lo))) & _BIT0


def _lane_map(lanes: int) -> bytes:
    """512 bytes, byte i = bit 0 of lane i (find(1) walks the set lanes)."""
    return lanes.to_bytes(TABLE_SIZE, "little")[::8]


def _leaf_runs(raw: int, leaves: int, level: int) -> tuple[bytes, bytes]:
    """First and last lanes of each run of contiguous leaves, as lane maps.

    ``leaves`` has bit 0 set in the lanes of ``raw`` that are leaf entries.
    A leaf continues the previous lane's run when that lane is a leaf too
    and its address + page size equals this lane's address.
    """
    shift = 12 + 9 * (level - 1)
    addr = raw & _LEAF_ADDR[level] & ((leaves << 64) - leaves)  # addresses (< 2**52) of leaves, 0 elsewhere
    prev = (leaves << 64) & _LANES                               # "previous lane is a leaf"
    expected = ((addr << 64) & _LANES) + (prev << shift)         # previous address + page size (< 2**53)
    differs = (((addr ^ expected) + _BELOW63) & _BIT63) >> 63    # lanes where addr != expected
    first = leaves & (differs | (prev ^ _BIT0))
    last = leaves & ~((leaves ^ first) >> 64)                    # next lane does not continue
    return _lane_map(first), _lane_map(last)


_ENTRY = struct.Struct("<Q")


class TableWalker:
    """What every page-table walker shares (this module's x86-64 one and
    :mod:`vmcorefs.core.paging_arm64`'s): the bounds on tables and runs,
    the counters of :class:`PageWalk`, and the run being coalesced.

    :meth:`table` fetches one 4 KiB table under the bounds (see the module
    docstring); :meth:`flush` emits the current run.  Both raise
    :class:`WalkStopped` when a bound is reached: :meth:`result` turns that
    into a truncated :class:`PageWalk`.
    """

    def __init__(self, read_phys: ReadPhys, phys_limit: int, max_tables: int, max_runs: int,
                 max_visits: int) -> None:
        self.read_phys = read_phys
        self.phys_limit = phys_limit
        self.max_tables = max_tables
        self.max_runs = max_runs
        self.max_visits = max_visits
        self.runs: list[Run] = []
        self.visits: dict[int, int] = {}
        self.refs = self.tables_read = self.skipped = self.shared = 0
        # Run being coalesced: [cv, nv) virtual maps [cp, np) physical;
        # empty when nv == cv (-1 at first: no address follows it).
        self.cv = self.cp = self.nv = self.np = -1

    def table(self, addr: int) -> bytes | None:
        """The table at ``addr`` (4096 bytes), or None when not to be followed."""
        self.refs += 1
        if self.refs > self.max_tables:
            raise WalkStopped
        if addr + TABLE_SIZE > self.phys_limit:
            self.skipped += 1
            return None
        visits = self.visits.get(addr, 0)
        if visits >= self.max_visits:
            self.shared += 1
            return None
        self.visits[addr] = visits + 1
        self.tables_read += 1
        try:
            data = self.read_phys(addr, TABLE_SIZE)
        except GuestMemoryError:
            self.skipped += 1
            return None
        if len(data) != TABLE_SIZE:
            data = bytes(data[:TABLE_SIZE]).ljust(TABLE_SIZE, b"\0")
        if data == _ZERO_TABLE:
            return None
        return data

    def flush(self) -> None:
        """Emit the run being coalesced, if any."""
        if self.nv != self.cv:
            if len(self.runs) >= self.max_runs:
                self.cv = self.nv = -1
                raise WalkStopped
            self.runs.append(Run(self.cv, self.cp, self.nv - self.cv))
            self.cv = self.nv = -1

    def result(self, walk: Callable[[], None]) -> PageWalk:
        """Run ``walk()`` then :meth:`flush`; a bound reached makes the
        result truncated, with the runs found so far."""
        truncated = False
        try:
            walk()
            self.flush()
        except WalkStopped:
            truncated = True
            if self.nv != self.cv and len(self.runs) < self.max_runs:
                self.flush()
        return PageWalk(self.runs, truncated, self.tables_read, self.skipped, self.shared)


class _Walker(TableWalker):
    """State of one x86-64 walk.

    Virtual addresses inside the walker are raw ``levels * 9 + 12``-bit
    linear addresses (``start``/``end`` are converted); they are made
    canonical when a run is emitted, so runs never coalesce across the
    non-canonical hole.
    """

    def __init__(self, read_phys: ReadPhys, levels: int, phys_limit: int, start: int,
                 end: int, max_tables: int, max_runs: int, max_visits: int) -> None:
        super().__init__(read_phys, phys_limit, max_tables, max_runs, max_visits)
        self.levels = levels
        bits = 12 + 9 * levels
        self.half = 1 << (bits - 1)
        self.upper = _U64 - (1 << bits)  # added to a raw upper-half address to sign-extend it
        self.start = self.to_raw(start)
        self.end = self.to_raw(end)

    def to_raw(self, va: int) -> int:
        """Canonical address -> raw linear address (the hole maps to its end)."""
        if va < self.half:
            return va
        return max(va - self.upper, self.half)

    def expand(self, addr: int, level: int, va_base: int) -> None:
        """The table at ``addr``, at ``level``, mapping from raw ``va_base``."""
        data = self.table(addr)
        if data is None:
            return
        raw = int.from_bytes(data, "little")
        shift = 12 + 9 * (level - 1)
        present = raw & _BIT0
        lo = (self.start - va_base) >> shift if self.start > va_base else 0
        hi = min(PTRS_PER_TABLE, (self.end - va_base + (1 << shift) - 1) >> shift)
        if lo > 0 or hi < PTRS_PER_TABLE:
            present &= _lanes(lo, hi)
        if not present:
            return
        if level == 1:
            leaves, tables = present, 0
        else:
            ps = (raw >> 7) & present
            tables = present ^ ps
            if level <= 3:
                leaves = ps
            else:  # PS in a PML4E/PML5E is reserved: the CPU would fault
                leaves = 0
                self.skipped += ps.bit_count()
        firsts, lasts = _leaf_runs(raw, leaves, level) if leaves else (b"", b"")
        i, j = firsts.find(1), lasts.find(1)
        if tables:
            # Table references and leaf runs in lane order (a reference ends a run).
            refs = _lane_map(tables)
            r = refs.find(1)
            while r >= 0:
                if 0 <= i < r:
                    i, j = self.leaves(data, firsts, lasts, i, j, r, va_base, shift)
                child = _ENTRY.unpack_from(data, 8 * r)[0] & PHYS_ADDR_MASK
                self.expand(child, level - 1, va_base + (r << shift))
                r = refs.find(1, r + 1)
        if i >= 0:
            self.leaves(data, firsts, lasts, i, j, PTRS_PER_TABLE, va_base, shift)

    def leaves(self, data: bytes, firsts: bytes, lasts: bytes, i: int, j: int, stop: int,
               va_base: int, shift: int) -> tuple[int, int]:
        """Add the leaf runs from lanes ``i``..``j`` on, up to lane ``stop``.

        Each is clipped to [start, end), made canonical and coalesced with
        the current run.  Returns the lanes of the next run not added.
        """
        start, end, half, upper = self.start, self.end, self.half, self.upper
        runs, max_runs = self.runs, self.max_runs
        amask = PHYS_ADDR_MASK & -(1 << shift)
        unpack = _ENTRY.unpack_from
        cv, cp, nv, np_ = self.cv, self.cp, self.nv, self.np
        while 0 <= i < stop:
            va = va_base + (i << shift)
            pa = unpack(data, 8 * i)[0] & amask
            size = (j - i + 1) << shift
            i, j = firsts.find(1, i + 1), lasts.find(1, j + 1)
            if va < start:
                pa += start - va
                size -= start - va
                va = start
            if va + size > end:
                size = end - va
            if va >= half:
                va += upper
            if va == nv and pa == np_:
                nv += size
                np_ += size
                continue
            if nv != cv:
                if len(runs) >= max_runs:
                    self.cv = self.nv = -1
                    raise WalkStopped
                runs.append(Run(cv, cp, nv - cv))
            cv, cp, nv, np_ = va, pa, va + size, pa + size
        self.cv, self.cp, self.nv, self.np = cv, cp, nv, np_
        return i, j


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
