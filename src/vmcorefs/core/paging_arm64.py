"""arm64 page-table walk: a guest kernel's TTBR1 tables -> virtual/physical runs.

Layout walked (Arm ARM, VMSAv8-64 stage 1 translation, 4 KiB granule; Linux
names in brackets).  The kernel half is what TTBR1_EL1 translates: virtual
addresses ``[2**64 - 2**va_bits, 2**64)`` with ``va_bits = 64 - TCR_EL1.T1SZ``.
The walk starts at the level that resolves the top bits, so the number of
levels is ``ceil((va_bits - 12) / 9)``::

    va_bits 52 (FEAT_LPA2):  L-1 [pgd] 16 entries    VA bits 51..48
    va_bits 48:               L0 [pgd, or p4d]      VA bits 47..39
    va_bits 39:               L1 [pgd, or pud]      VA bits 38..30   0b01: 1 GiB block
                              L2 [pmd]              VA bits 29..21   0b01: 2 MiB block
                              L3 [pte]              VA bits 20..12   0b11: 4 KiB page

    every table: 4 KiB, 512 little-endian u64 descriptors (the top one has
    2**(va_bits - 12 - 9 * (levels - 1)) of them)
    descriptor bits 1..0:  0b11 table (L-1..L2) or page (L3)
                           0b01 block (L1, L2; L0 too with FEAT_LPA2's DS=1),
                                reserved elsewhere (the MMU faults)
                           0bx0 invalid (the rest is ignored)
    output address:  DS=0 (va_bits <= 48)  bits 47..12
                     DS=1 (va_bits 52)     bits 49..12, and bits 51..50 in
                                           descriptor bits 9..8
                     a block's address is aligned to its size

Every other bit (attributes, AF, contiguous hint, software bits, PXN/UXN,
GP, DBM) is ignored: a descriptor with AF clear still translates.
:func:`walk` returns the mappings as :class:`~vmcorefs.core.paging.Run`
objects in a :class:`~vmcorefs.core.paging.PageWalk`, coalesced wherever
both the virtual and the physical side continue, in increasing virtual
order -- the same result as the x86-64 walker (:mod:`vmcorefs.core.paging`).

The guest controls its page tables, so nothing in them is trusted; the
bounds are those of the x86-64 walker:

* a table address outside ``[0, phys_limit)`` is not read (counted in
  :attr:`PageWalk.skipped`), nor is one whose read raises
  :class:`~vmcorefs.errors.GuestMemoryError`; a short read is zero-padded;
  a reserved descriptor (0b01 where no block is allowed) is skipped and
  counted;
* one table page is expanded at most ``max_visits`` times (default 1);
  later references are counted in :attr:`PageWalk.shared`;
* at most ``max_tables`` table references are handled and at most
  ``max_runs`` runs are returned; reaching either bound stops the walk
  with :attr:`PageWalk.truncated` set (no exception).  Depth is bounded by
  the number of levels.

Cost: one Python iteration per valid descriptor (a table of 512 page
descriptors costs about 100 us); bounded by ``max_tables`` and ``max_runs``.
A 512 MiB guest whose linear map uses 4 KiB pages (Debian's
``rodata=full``) walks in well under a second.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping

from vmcorefs.core.layout import PAGE_SIZE
from vmcorefs.core.paging import PageWalk, ReadPhys, TableWalker
from vmcorefs.errors import FormatError

TABLE_SIZE = 4096
#: Descriptor type bits 1..0.
DESC_VALID = 1 << 0
DESC_TABLE = 1 << 1  # with DESC_VALID: table (or, at L3, page); without: block
#: Output address bits 47..12 (DS=0) and 49..12 (DS=1; OA[51:50] in bits 9..8).
OA_MASK = 0x0000_FFFF_FFFF_F000
OA_MASK_LPA2 = 0x0003_FFFF_FFFF_F000
#: VA sizes the walker accepts for a 4 KiB granule: 3 to 5 levels.
MIN_VA_BITS, MAX_VA_BITS_DS0, MAX_VA_BITS = 25, 48, 52

_U64 = 1 << 64
_TABLE = struct.Struct("<512Q")


def levels_for(va_bits: int) -> int:
    """Translation levels of a 4 KiB-granule walk of a ``va_bits`` address
    space (48 -> 4, 39 -> 3, 52 -> 5).  Raises ValueError outside 25..52."""
    if not MIN_VA_BITS <= va_bits <= MAX_VA_BITS:
        raise ValueError(f"va_bits must be {MIN_VA_BITS}..{MAX_VA_BITS} for a 4 KiB granule, not {va_bits}")
    return (va_bits - 12 + 8) // 9


def kernel_half(va_bits: int) -> int:
    """First address TTBR1 translates: ``2**64 - 2**va_bits``."""
    return _U64 - (1 << va_bits)


def walk(read_phys: ReadPhys, root: int, *, va_bits: int = 48, lpa2: bool | None = None,
         phys_limit: int, start: int | None = None, end: int = _U64, max_tables: int = 1 << 16,
         max_runs: int = 1 << 20, max_visits: int = 1) -> PageWalk:
    """Walk the TTBR1 tables at ``root`` and return the mappings of ``[start, end)``.

    ``root`` is the physical address of the top-level table (Linux's
    ``swapper_pg_dir``, :func:`kernel_root_from_vmcoreinfo`).  ``va_bits``
    is the kernel half's size (``64 - TCR_EL1.T1SZ``); ``lpa2`` is
    TCR_EL1.DS (default: True exactly when ``va_bits`` exceeds 48, which a
    4 KiB granule allows only with FEAT_LPA2).  ``start`` defaults to
    :func:`kernel_half`; the walk covers the part of ``[start, end)``
    (page-aligned, ``end`` may be 2**64) that TTBR1 translates.  Bounds and
    hostile-input behaviour are described in the module docstring.  Raises
    ValueError for bad arguments (never for bad tables).
    """
    levels = levels_for(va_bits)
    if lpa2 is None:
        lpa2 = va_bits > MAX_VA_BITS_DS0
    if va_bits > MAX_VA_BITS_DS0 and not lpa2:
        raise ValueError(f"va_bits {va_bits} needs FEAT_LPA2 (lpa2=True) with a 4 KiB granule")
    base = kernel_half(va_bits)
    if start is None:
        start = base
    if not 0 <= start <= end <= _U64 or (start | end) % PAGE_SIZE:
        raise ValueError(f"bad range [{start:#x}, {end:#x}): need 0 <= start <= end <= 2**64, page-aligned")
    if root % TABLE_SIZE or not 0 <= root < 1 << 52:
        raise ValueError(f"root {root:#x} is not a page-aligned physical address")
    w = _Walker(read_phys, levels, lpa2, phys_limit, base, max(start, base), max(end, base),
                max_tables, max_runs, max_visits)
    top_entries = 1 << (va_bits - 12 - 9 * (levels - 1))
    return w.result(lambda: w.expand(root, levels, 0, top_entries) if w.start < w.end else None)


class _Walker(TableWalker):
    """State of one arm64 walk.  Virtual addresses inside are offsets from
    the kernel half's base (``va - base``); runs are emitted as full addresses."""

    def __init__(self, read_phys: ReadPhys, levels: int, lpa2: bool, phys_limit: int, base: int,
                 start: int, end: int, max_tables: int, max_runs: int, max_visits: int) -> None:
        super().__init__(read_phys, phys_limit, max_tables, max_runs, max_visits)
        self.levels = levels
        self.lpa2 = lpa2
        self.base = base
        self.start = start - base
        self.end = end - base

    def address(self, desc: int) -> int:
        """Output address of a descriptor (not yet aligned to a block's size)."""
        if self.lpa2:
            return (desc & OA_MASK_LPA2) | ((desc >> 8) & 3) << 50
        return desc & OA_MASK

    def descriptors(self, addr: int) -> tuple[int, ...] | None:
        """The 512 descriptors at ``addr`` (:meth:`TableWalker.table`'s bounds), or None."""
        data = self.table(addr)
        return None if data is None else _TABLE.unpack(data)

    def expand(self, addr: int, level: int, va_base: int, entries: int) -> None:
        """The table at ``addr`` with ``entries`` used descriptors, ``level``
        levels above the pages (1 = L3), mapping from offset ``va_base``."""
        descs = self.descriptors(addr)
        if descs is None:
            return
        shift = 12 + 9 * (level - 1)
        size = 1 << shift
        lo = (self.start - va_base) >> shift if self.start > va_base else 0
        hi = min(entries, (self.end - va_base + size - 1) >> shift)
        # Blocks: L1/L2 (level 3/2), and L0 (level 4) under DS=1.
        block_ok = 1 < level <= 3 or (level == 4 and self.lpa2)
        for i in range(lo, hi):
            d = descs[i]
            if not d & DESC_VALID:
                continue
            if d & DESC_TABLE:
                if level == 1:
                    self.leaf(va_base + (i << shift), self.address(d), size)
                else:
                    self.expand(self.address(d), level - 1, va_base + (i << shift), 512)
            elif block_ok:
                self.leaf(va_base + (i << shift), self.address(d) & -size, size)
            else:
                self.skipped += 1  # 0b01 at L3, L0 (DS=0) or L-1: reserved

    def leaf(self, va: int, pa: int, size: int) -> None:
        """Add ``size`` bytes at offset ``va`` -> ``pa``, clipped to the
        range, coalesced with the current run."""
        if va < self.start:
            pa += self.start - va
            size -= self.start - va
            va = self.start
        if va + size > self.end:
            size = self.end - va
        va += self.base
        if va == self.nv and pa == self.np:
            self.nv += size
            self.np += size
            return
        self.flush()
        self.cv, self.cp, self.nv, self.np = va, pa, va + size, pa + size


_HEX = re.compile(r"(?:0x)?([0-9a-fA-F]{1,16})")
_DEC = re.compile(r"[0-9]{1,3}")


def _hex(vmcoreinfo: Mapping[str, str], key: str) -> int:
    raw = vmcoreinfo.get(key)
    if raw is None:
        raise FormatError(f"VMCOREINFO has no {key}")
    m = _HEX.fullmatch(raw)
    if not m:
        raise FormatError(f"VMCOREINFO {key}={raw[:40]!r} is not a hex number")
    return int(m.group(1), 16)


def va_bits_from_vmcoreinfo(vmcoreinfo: Mapping[str, str]) -> int:
    """The kernel half's size in bits: ``64 - NUMBER(TCR_EL1_T1SZ)`` (Linux
    5.9+; what the MMU uses, e.g. 48 for a 52-bit kernel on a CPU without
    52-bit VAs), else ``NUMBER(VA_BITS)``.  Raises FormatError when neither
    is there or the value is not one a 4 KiB granule allows."""
    if "NUMBER(TCR_EL1_T1SZ)" in vmcoreinfo:
        bits = 64 - _hex(vmcoreinfo, "NUMBER(TCR_EL1_T1SZ)")
        source = "64 - NUMBER(TCR_EL1_T1SZ)"
    else:
        raw = vmcoreinfo.get("NUMBER(VA_BITS)")
        if raw is None:
            raise FormatError("VMCOREINFO has neither NUMBER(TCR_EL1_T1SZ) nor NUMBER(VA_BITS)")
        if not _DEC.fullmatch(raw):
            raise FormatError(f"VMCOREINFO NUMBER(VA_BITS)={raw[:40]!r} is not a decimal number")
        bits, source = int(raw), "NUMBER(VA_BITS)"
    if not MIN_VA_BITS <= bits <= MAX_VA_BITS:
        raise FormatError(f"VMCOREINFO {source} gives {bits}-bit virtual addresses: not a 4 KiB-granule size")
    return bits


def kernel_root_from_vmcoreinfo(vmcoreinfo: Mapping[str, str]) -> tuple[int, int]:
    """``(physical address of swapper_pg_dir, va_bits)`` of an arm64 kernel.

    From the keys of Linux's ``crash_save_vmcoreinfo`` and arm64's
    ``arch_crash_save_vmcoreinfo``: ``SYMBOL(swapper_pg_dir)``, a
    kernel-image address translated as ``__pa_symbol`` does::

        phys = vaddr - kimage_voffset        (mod 2**64)

    with ``NUMBER(kimage_voffset)`` (hex), and ``va_bits`` from
    :func:`va_bits_from_vmcoreinfo`.  Only a 4 KiB granule is walked:
    ``PAGESIZE`` other than 4096 is refused.  Raises FormatError when a key
    is missing or garbled or the root is not a page-aligned physical address.
    """
    page = vmcoreinfo.get("PAGESIZE", "4096")
    if page != "4096":
        raise FormatError(f"VMCOREINFO PAGESIZE={page[:40]!r}: only 4 KiB-granule arm64 tables are walked")
    vaddr = _hex(vmcoreinfo, "SYMBOL(swapper_pg_dir)")
    voffset = _hex(vmcoreinfo, "NUMBER(kimage_voffset)")
    va_bits = va_bits_from_vmcoreinfo(vmcoreinfo)
    if vaddr < kernel_half(va_bits):
        raise FormatError(f"VMCOREINFO SYMBOL(swapper_pg_dir)={vaddr:#x} is not a kernel address")
    phys = (vaddr - voffset) % _U64
    if phys % TABLE_SIZE or phys >= 1 << 52:
        raise FormatError(f"VMCOREINFO gives page-table root {phys:#x}: not a page-aligned physical address")
    return phys, va_bits
