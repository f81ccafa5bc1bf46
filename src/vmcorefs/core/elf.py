"""ELF core layout of ``vmcore``, and parsing of QEMU's own dumps.

Layout written by :func:`build_vmcore` (ELF64, little-endian, ``<elf.h>``
names)::

    0                       Elf64_Ehdr        e_phoff = 64, e_shoff = 0
    64                      Elf64_Phdr[e_phnum]
                              [0]  PT_NOTE    p_offset -> note data
                              [1:] PT_LOAD    one per guest-physical block
    (Elf64_Shdr[1])         only when the count needs PN_XNUM
    notes                   the PT_NOTE data, verbatim from QEMU
    pad to 4 KiB
    PT_LOAD data            each p_offset page-aligned, p_filesz == p_memsz

Program headers come right after the ELF header because makedumpfile reads
them at offset 64 (QEMU 7.2 writes its section headers first, which
makedumpfile rejects).  ``e_ident``, ``e_machine`` and ``e_flags``, the
PT_LOAD ``p_vaddr`` convention and the note bytes are taken from QEMU's own
``dump-guest-memory`` output (:func:`parse_qemu_dump`), so the file matches a
QEMU dump of the same instant.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmcorefs.core.layout import Segment, SparseFile
from vmcorefs.errors import FormatError

# <elf.h>
EI_NIDENT = 16
ELFMAG = b"\x7fELF"
EI_CLASS, EI_DATA = 4, 5
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
EV_CURRENT = 1
ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF
SHT_NULL = 0

PAGE_SIZE = 4096

#: Elf64_Ehdr: e_ident, e_type, e_machine, e_version, e_entry, e_phoff,
#: e_shoff, e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum,
#: e_shstrndx.
ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
#: Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz,
#: p_memsz, p_align.
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
#: Elf64_Shdr: sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size,
#: sh_link, sh_info, sh_addralign, sh_entsize.
ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")
#: Elf32_Ehdr / Elf32_Phdr (only parsed: QEMU dumps 32-bit guests as ELF32).
ELF32_EHDR = struct.Struct("<16sHHIIIIIHHHHHH")
ELF32_PHDR = struct.Struct("<IIIIIIII")

#: Bound on the PT_NOTE we accept from QEMU: vCPU notes are ~1 KiB each and
#: QEMU caps the guest's VMCOREINFO at 1 MiB.
MAX_NOTES_SIZE = 64 << 20


@dataclass(frozen=True)
class DumpInfo:
    """What vmcorefs takes from a QEMU ``dump-guest-memory`` ELF file."""

    e_ident: bytes
    e_machine: int
    e_flags: int
    notes: bytes
    #: QEMU writes p_vaddr = p_paddr for paging=false dumps (7.2); older
    #: versions wrote 0.  True when the sample PT_LOAD had p_vaddr == p_paddr.
    vaddr_is_paddr: bool


def align_up(value: int, align: int = PAGE_SIZE) -> int:
    return (value + align - 1) // align * align


def parse_qemu_dump(data: bytes) -> DumpInfo:
    """Extract ELF identity and the PT_NOTE bytes from a QEMU dump's start.

    ``data`` must contain the ELF header, program headers and note data
    (a dump of a 1-byte range is enough).  ELF32 dumps (guests not in long
    mode) are accepted; their notes are kept verbatim.
    """
    if len(data) < EI_NIDENT or data[:4] != ELFMAG:
        raise FormatError("QEMU dump does not start with an ELF header")
    if data[EI_DATA] != ELFDATA2LSB:
        raise FormatError("QEMU dump is big-endian; only little-endian guests are supported")
    cls = data[EI_CLASS]
    if cls == ELFCLASS64:
        ehdr, phdr = ELF64_EHDR, ELF64_PHDR
    elif cls == ELFCLASS32:
        ehdr, phdr = ELF32_EHDR, ELF32_PHDR
    else:
        raise FormatError(f"QEMU dump has unknown ELF class {cls}")
    if len(data) < ehdr.size:
        raise FormatError("QEMU dump truncated in its ELF header")
    (ident, e_type, e_machine, _v, _entry, e_phoff, e_shoff, e_flags,
     _ehsize, e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = ehdr.unpack_from(data)
    if e_type != ET_CORE:
        raise FormatError(f"QEMU dump has e_type {e_type}, not ET_CORE")
    if e_phnum == PN_XNUM:
        # Real count in section header 0's sh_info.
        if cls != ELFCLASS64 or e_shoff + ELF64_SHDR.size > len(data):
            raise FormatError("QEMU dump uses PN_XNUM without a readable section header")
        e_phnum = ELF64_SHDR.unpack_from(data, e_shoff)[7]
    if e_phentsize != phdr.size or e_phnum < 1 or e_phoff + e_phnum * phdr.size > len(data):
        raise FormatError("QEMU dump program headers are truncated or malformed")
    notes = b""
    vaddr_is_paddr = True
    found_note = found_load = False
    for i in range(e_phnum):
        fields = phdr.unpack_from(data, e_phoff + i * phdr.size)
        if cls == ELFCLASS64:
            p_type, _fl, p_offset, p_vaddr, p_paddr, p_filesz = fields[:6]
        else:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz = fields[:5]
        if p_type == PT_NOTE and not found_note:
            if p_filesz > MAX_NOTES_SIZE or p_offset + p_filesz > len(data):
                raise FormatError(f"QEMU dump PT_NOTE ({p_filesz} bytes at {p_offset:#x}) is out of bounds")
            notes = bytes(data[p_offset:p_offset + p_filesz])
            found_note = True
        elif p_type == PT_LOAD and not found_load:
            vaddr_is_paddr = p_vaddr == p_paddr
            found_load = True
    if not found_note:
        raise FormatError("QEMU dump has no PT_NOTE")
    return DumpInfo(bytes(ident), e_machine, e_flags, notes, vaddr_is_paddr)


@dataclass(frozen=True)
class LoadRange:
    """A PT_LOAD to write: ``p_memsz`` bytes of guest-physical ``p_paddr``."""

    p_paddr: int
    p_vaddr: int
    p_memsz: int


def build_vmcore(info: DumpInfo, loads: list[LoadRange]) -> SparseFile:
    """Lay out a live ELF64 core: headers, notes, then page-aligned PT_LOADs."""
    phnum = 1 + len(loads)
    use_xnum = phnum >= PN_XNUM
    ph_end = ELF64_EHDR.size + phnum * ELF64_PHDR.size
    shoff = ph_end if use_xnum else 0
    notes_off = ph_end + (ELF64_SHDR.size if use_xnum else 0)
    notes_end = notes_off + len(info.notes)

    ident = bytearray(info.e_ident[:EI_NIDENT].ljust(EI_NIDENT, b"\0"))
    ident[EI_CLASS] = ELFCLASS64
    ident[EI_DATA] = ELFDATA2LSB
    ehdr = ELF64_EHDR.pack(
        bytes(ident), ET_CORE, info.e_machine, EV_CURRENT, 0,
        ELF64_EHDR.size, shoff, info.e_flags, ELF64_EHDR.size, ELF64_PHDR.size,
        PN_XNUM if use_xnum else phnum,
        ELF64_SHDR.size if use_xnum else 0, 1 if use_xnum else 0, 0,
    )
    phdrs = [ELF64_PHDR.pack(PT_NOTE, 0, notes_off, 0, 0, len(info.notes), len(info.notes), 0)]
    segments: list[Segment] = []
    offset = align_up(notes_end)
    for load in loads:
        phdrs.append(ELF64_PHDR.pack(PT_LOAD, 0, offset, load.p_vaddr, load.p_paddr,
                                     load.p_memsz, load.p_memsz, 0))
        segments.append(Segment(offset, load.p_paddr, load.p_memsz))
        offset = align_up(offset + load.p_memsz)
    shdr = ELF64_SHDR.pack(0, SHT_NULL, 0, 0, 0, 0, 0, phnum, 0, 0) if use_xnum else b""
    prefix = ehdr + b"".join(phdrs) + shdr + info.notes
    size = segments[-1].offset + segments[-1].size if segments else len(prefix)
    return SparseFile(prefix, tuple(segments), size)


def build_pmem(blocks: list[tuple[int, int]]) -> SparseFile:
    """Raw guest-physical memory: ``(gpa, size)`` blocks at offset == gpa."""
    segments = tuple(Segment(gpa, gpa, size) for gpa, size in sorted(blocks))
    size = max((gpa + n for gpa, n in blocks), default=0)
    return SparseFile(b"", segments, size)
