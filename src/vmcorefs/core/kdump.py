"""The kdump-compressed file format (makedumpfile's "diskdump" format), pure.

What crash (``diskdump.c``), libkdumpfile (drgn) and makedumpfile read, and
what QEMU's ``dump-guest-memory format=kdump-*`` writes (header version 6).
Every part starts on a block (= page) boundary:

======================  ====================================================
block 0                 :class:`disk_dump_header` (``KDUMP   ``, utsname, sizes)
blocks 1..sub_hdr_size  :class:`kdump_sub_header`, then the ELF notes
                        (VMCOREINFO's desc is also named by its offset/size)
bitmap_blocks           bitmap 1 (valid PFNs) then bitmap 2 (dumped PFNs),
                        each half of the blocks; bit ``pfn & 7`` of byte
                        ``pfn >> 3``
page descriptors        one :data:`PAGE_DESC` per dumped PFN, in PFN order
page data               each page zlib/lzo/snappy-compressed, or raw
                        (``flags`` 0) when compression does not shrink it
======================  ====================================================

Field names are makedumpfile's (``diskdump_mod.h``).  Here every page of
every RAM block is dumped (bitmap 2 = bitmap 1, dump level 0, as QEMU
writes it); all-zero pages share one stored page, as in QEMU's files.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from vmcorefs.core.cstruct import CStruct
from vmcorefs.core.layout import PAGE_SIZE, align_up
from vmcorefs.core.notes import NT_PRSTATUS, parse_notes
from vmcorefs.core.paging import START_KERNEL_MAP

KDUMP_SIGNATURE = b"KDUMP   "
HEADER_VERSION = 6
#: ``status`` of the header and ``flags`` of a page descriptor.
DUMP_DH_COMPRESSED_ZLIB = 0x1
DUMP_DH_COMPRESSED_LZO = 0x2
DUMP_DH_COMPRESSED_SNAPPY = 0x4
UTS_LEN = 65
#: ``struct timeval`` at offset 408 (8-aligned after 402 bytes): 6 bytes of padding first.
_TIMESTAMP = struct.Struct("<6xqq")


@dataclass(frozen=True)
class disk_dump_header(CStruct):  # noqa: N801 -- makedumpfile's name
    """Block 0 (makedumpfile's ``struct disk_dump_header``, 64-bit, without ``tasks[]``)."""

    STRUCT = struct.Struct("<8sI390s22sIIIIIIIIII")
    signature: bytes
    header_version: int
    utsname: bytes
    timestamp: bytes
    status: int
    block_size: int
    sub_hdr_size: int
    bitmap_blocks: int
    max_mapnr: int
    total_ram_blocks: int
    device_blocks: int
    written_blocks: int
    current_cpu: int
    nr_cpus: int


@dataclass(frozen=True)
class kdump_sub_header(CStruct):  # noqa: N801
    """Block 1 (``struct kdump_sub_header``, 64-bit)."""

    STRUCT = struct.Struct("<QiiQQQQQQQQQQQ")
    phys_base: int
    dump_level: int
    split: int
    start_pfn: int
    end_pfn: int
    offset_vmcoreinfo: int
    size_vmcoreinfo: int
    offset_note: int
    size_note: int
    offset_eraseinfo: int
    size_eraseinfo: int
    start_pfn_64: int
    end_pfn_64: int
    max_mapnr_64: int


#: makedumpfile's ``struct page_desc``, one per dumped page: ``offset`` (u64,
#: of the page's data in the file), ``size`` (u32, its bytes), ``flags``
#: (u32, its compression, 0 for raw), ``page_flags`` (u64, 0).
PAGE_DESC = struct.Struct("<QIIQ")


UTSNAME_SIZE = 6 * UTS_LEN


def utsname(sysname: str, release: str, version: str, machine: str) -> bytes:
    """``struct new_utsname``: six NUL-padded 65-byte fields (no node or domain name)."""
    fields = [sysname, "", release, version, machine, ""]
    return b"".join(f.encode()[:UTS_LEN - 1].ljust(UTS_LEN, b"\0") for f in fields)


def utsname_paddr(vmcoreinfo: dict[str, str] | None) -> int | None:
    """Guest-physical address of ``init_uts_ns.name`` (the kernel's own
    ``struct new_utsname``), from VMCOREINFO's ``SYMBOL(init_uts_ns)``,
    ``OFFSET(uts_namespace.name)`` and ``NUMBER(phys_base)`` as
    ``__pa_symbol`` computes it; None when a key is missing or garbled."""
    fields = vmcoreinfo or {}
    try:
        vaddr = int(fields["SYMBOL(init_uts_ns)"], 16) + int(fields.get("OFFSET(uts_namespace.name)", "0"))
        phys_base = int(fields["NUMBER(phys_base)"])
    except (KeyError, ValueError):
        return None
    if vaddr < START_KERNEL_MAP:
        return None
    return (vaddr - START_KERNEL_MAP + phys_base) % (1 << 64)


def uts_looks_sane(uts: bytes) -> bool:
    """What readers check before trusting a header's utsname: six
    NUL-terminated fields, sysname ``Linux``, release, version and machine
    not empty."""
    if len(uts) != UTSNAME_SIZE:
        return False
    f = [uts[i * UTS_LEN:(i + 1) * UTS_LEN] for i in range(6)]
    return (all(x[-1] == 0 for x in f) and f[0].split(b"\0", 1)[0] == b"Linux"
            and all(f[i][0] != 0 for i in (2, 3, 4)))


@dataclass(frozen=True)
class KdumpLayout:
    """Where everything goes: ``head`` (blocks 0 to the end of the bitmaps,
    written at offset 0), descriptors from ``desc_offset`` (``pages`` of
    them, :data:`PAGE_DESC` size each), page data from ``data_offset``."""

    head: bytes
    desc_offset: int
    data_offset: int
    pages: int


def kdump_layout(notes: bytes, vmcoreinfo: dict[str, str] | None, ranges: Iterable[tuple[int, int]],
                 status: int, uts: bytes, seconds: int) -> KdumpLayout:
    """The layout of a level-0 dump of the guest-physical ``ranges``
    (``(start, size)`` bytes, page-aligned) with ELF ``notes`` (QEMU's
    PT_NOTE bytes) and ``vmcoreinfo`` (its fields: ``NUMBER(phys_base)``);
    ``status`` the compression (``DUMP_DH_COMPRESSED_*``); ``uts`` the
    header's ``struct new_utsname`` (the guest's ``init_uts_ns.name``, see
    :func:`utsname_paddr`, else :func:`utsname`); ``seconds`` the timestamp."""
    pfn_ranges = sorted((start // PAGE_SIZE, (start + size) // PAGE_SIZE) for start, size in ranges if size)
    max_mapnr = max((end for _, end in pfn_ranges), default=0)
    half = align_up(max(1, (max_mapnr + 7) // 8))
    bitmap = bytearray(half)
    for lo, hi in pfn_ranges:
        _set_bits(bitmap, lo, hi)
    pages = sum(hi - lo for lo, hi in pfn_ranges)

    # Sub-header, then the notes, then (inside them) VMCOREINFO's desc.
    sub_size = kdump_sub_header.size()
    offset_note = PAGE_SIZE + sub_size
    off_vci, size_vci = _vmcoreinfo_desc(notes)
    fields = vmcoreinfo or {}
    phys_base = _int(fields.get("NUMBER(phys_base)")) & 0xFFFF_FFFF_FFFF_FFFF  # may be negative (KASLR)
    sub_hdr_size = align_up(sub_size + len(notes)) // PAGE_SIZE
    sub = kdump_sub_header(
        phys_base=phys_base, dump_level=0, split=0, start_pfn=0, end_pfn=max_mapnr,
        offset_vmcoreinfo=offset_note + off_vci if size_vci else 0, size_vmcoreinfo=size_vci,
        offset_note=offset_note, size_note=len(notes), offset_eraseinfo=0, size_eraseinfo=0,
        start_pfn_64=0, end_pfn_64=max_mapnr, max_mapnr_64=max_mapnr)
    bitmap_blocks = 2 * half // PAGE_SIZE
    nr_cpus = sum(1 for n in parse_notes(notes) if n.name == "CORE" and n.type == NT_PRSTATUS)
    header = disk_dump_header(
        signature=KDUMP_SIGNATURE, header_version=HEADER_VERSION,
        utsname=uts,
        timestamp=_TIMESTAMP.pack(seconds, 0), status=status, block_size=PAGE_SIZE,
        sub_hdr_size=sub_hdr_size, bitmap_blocks=bitmap_blocks, max_mapnr=min(max_mapnr, 0xFFFFFFFF),
        total_ram_blocks=0, device_blocks=0, written_blocks=0, current_cpu=0, nr_cpus=nr_cpus)
    head = bytearray(PAGE_SIZE * (1 + sub_hdr_size))
    hb = header.pack()
    head[:len(hb)] = hb
    sb = sub.pack()
    head[PAGE_SIZE:PAGE_SIZE + len(sb)] = sb
    head[offset_note:offset_note + len(notes)] = notes
    # Bitmap 2 = bitmap 1: every RAM page is dumped.  One join, one copy
    # (each bitmap is 8 MiB for a 256 GiB guest).
    full = b"".join((head, bitmap, bitmap))
    desc_offset = len(full)
    data_offset = align_up(desc_offset + pages * PAGE_DESC.size)
    return KdumpLayout(full, desc_offset, data_offset, pages)


def _set_bits(bitmap: bytearray, lo: int, hi: int) -> None:
    """Set bits ``[lo, hi)`` of ``bitmap`` (LSB first in each byte)."""
    while lo < hi and lo % 8:
        bitmap[lo >> 3] |= 1 << (lo & 7)
        lo += 1
    full_end = hi - hi % 8
    if lo < full_end:
        bitmap[lo >> 3:full_end >> 3] = b"\xff" * ((full_end - lo) >> 3)
        lo = full_end
    while lo < hi:
        bitmap[lo >> 3] |= 1 << (lo & 7)
        lo += 1


def _vmcoreinfo_desc(notes: bytes) -> tuple[int, int]:
    """Offset and size of the VMCOREINFO note's desc inside ``notes`` ((0, 0) if none)."""
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, _ = struct.unpack_from("<III", notes, pos)
        desc = pos + 12 + (namesz + 3) // 4 * 4
        if notes[pos + 12:pos + 12 + namesz].rstrip(b"\0") == b"VMCOREINFO":
            return desc, descsz
        pos = desc + (descsz + 3) // 4 * 4
    return 0, 0


def _int(text: str | None) -> int:
    try:
        return int(text or "0", 0) if (text or "").startswith("0x") else int(text or "0")
    except ValueError:
        return 0
