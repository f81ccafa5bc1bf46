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
from typing import Sequence

from vmcorefs.core.cstruct import CStruct
from vmcorefs.core.layout import SparseFile, align_up, memory
from vmcorefs.core.paging import Run
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

@dataclass(frozen=True)
class Elf64_Ehdr(CStruct):  # noqa: N801 (the spec's name)
    STRUCT = struct.Struct("<16sHHIQQQIHHHHHH")
    e_ident: bytes
    e_type: int
    e_machine: int
    e_version: int
    e_entry: int
    e_phoff: int
    e_shoff: int
    e_flags: int
    e_ehsize: int
    e_phentsize: int
    e_phnum: int
    e_shentsize: int
    e_shnum: int
    e_shstrndx: int


@dataclass(frozen=True)
class Elf32_Ehdr(Elf64_Ehdr):  # noqa: N801
    """Only parsed: QEMU dumps guests that are not in long mode as ELF32
    (the same fields as Elf64_Ehdr, 32-bit addresses and offsets)."""

    STRUCT = struct.Struct("<16sHHIIIIIHHHHHH")


@dataclass(frozen=True)
class Elf64_Phdr(CStruct):  # noqa: N801
    STRUCT = struct.Struct("<IIQQQQQQ")
    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int


@dataclass(frozen=True)
class Elf32_Phdr(CStruct):  # noqa: N801
    """Only parsed (note the field order differs from Elf64_Phdr's)."""

    STRUCT = struct.Struct("<IIIIIIII")
    p_type: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_flags: int
    p_align: int


@dataclass(frozen=True)
class Elf64_Shdr(CStruct):  # noqa: N801
    STRUCT = struct.Struct("<IIQQQQIIQQ")
    sh_name: int
    sh_type: int
    sh_flags: int
    sh_addr: int
    sh_offset: int
    sh_size: int
    sh_link: int
    sh_info: int
    sh_addralign: int
    sh_entsize: int


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
    #: The dump's PT_LOADs as ``(p_paddr, p_memsz)`` in bytes, in file
    #: order: the guest-physical blocks QEMU dumps (only the plugged parts of
    #: virtio-mem).  A dump filtered with ``begin``/``length`` lists only
    #: that range; empty when the notes were not taken from a dump.
    loads: tuple[tuple[int, int], ...] = ()


class _Truncated(FormatError):
    """The data ends before the dump's headers and notes do."""


def _qemu_dump_headers(data: bytes) -> tuple[Elf64_Ehdr, list[Elf64_Phdr | Elf32_Phdr], int]:
    """ELF header, program headers and the offset where the last of the
    headers and notes ends.  Raises :class:`_Truncated` when ``data`` is too
    short to hold them, :class:`FormatError` when they are malformed."""
    if len(data) < EI_NIDENT:
        raise _Truncated("QEMU dump truncated in its ELF header")
    if data[:4] != ELFMAG:
        raise FormatError("QEMU dump does not start with an ELF header")
    if data[EI_DATA] != ELFDATA2LSB:
        raise FormatError("QEMU dump is big-endian; only little-endian guests are supported")
    cls = data[EI_CLASS]
    ehdr_t: type[Elf64_Ehdr | Elf32_Ehdr]
    phdr_t: type[Elf64_Phdr | Elf32_Phdr]
    if cls == ELFCLASS64:
        ehdr_t, phdr_t = Elf64_Ehdr, Elf64_Phdr
    elif cls == ELFCLASS32:
        ehdr_t, phdr_t = Elf32_Ehdr, Elf32_Phdr
    else:
        raise FormatError(f"QEMU dump has unknown ELF class {cls}")
    if len(data) < ehdr_t.size():
        raise _Truncated("QEMU dump truncated in its ELF header")
    ehdr = ehdr_t.unpack_from(data)
    if ehdr.e_type != ET_CORE:
        raise FormatError(f"QEMU dump has e_type {ehdr.e_type}, not ET_CORE")
    e_phnum = ehdr.e_phnum
    end = ehdr_t.size()
    if e_phnum == PN_XNUM:
        # Real count in section header 0's sh_info.
        if cls != ELFCLASS64:
            raise FormatError("QEMU dump uses PN_XNUM without a readable section header")
        end = max(end, ehdr.e_shoff + Elf64_Shdr.size())
        if end > len(data):
            raise _Truncated("QEMU dump uses PN_XNUM without a readable section header")
        e_phnum = Elf64_Shdr.unpack_from(data, ehdr.e_shoff).sh_info
    phsize = phdr_t.size()
    if ehdr.e_phentsize != phsize or e_phnum < 1:
        raise FormatError("QEMU dump program headers are truncated or malformed")
    end = max(end, ehdr.e_phoff + e_phnum * phsize)
    if end > len(data):
        raise _Truncated("QEMU dump program headers are truncated or malformed")
    phdrs = [phdr_t.unpack_from(data, ehdr.e_phoff + i * phsize) for i in range(e_phnum)]
    note = next((ph for ph in phdrs if ph.p_type == PT_NOTE), None)
    if note is None:
        raise FormatError("QEMU dump has no PT_NOTE")
    if note.p_filesz > MAX_NOTES_SIZE:
        raise FormatError(f"QEMU dump PT_NOTE ({note.p_filesz} bytes at {note.p_offset:#x}) is out of bounds")
    end = max(end, note.p_offset + note.p_filesz)
    if end > len(data):
        raise _Truncated(f"QEMU dump PT_NOTE ({note.p_filesz} bytes at {note.p_offset:#x}) is out of bounds")
    return ehdr, phdrs, end


def qemu_dump_headers_end(data: bytes) -> int | None:
    """How many bytes of a QEMU dump's start hold its ELF header, section
    header 0 (``PN_XNUM``), program headers and notes -- all that
    :func:`parse_qemu_dump` needs -- or None when ``data`` (the dump's first
    bytes) is too short to tell.  Raises :class:`FormatError` as
    :func:`parse_qemu_dump` for malformed headers."""
    try:
        return _qemu_dump_headers(data)[2]
    except _Truncated:
        return None


def parse_qemu_dump(data: bytes) -> DumpInfo:
    """Extract ELF identity, the PT_NOTE bytes and the PT_LOADs from a QEMU dump's start.

    ``data`` must contain the ELF header, program headers and note data
    (a dump of a 1-byte range is enough; :func:`qemu_dump_headers_end`
    says how much).  ELF32 dumps (guests not in long mode) are accepted;
    their notes are kept verbatim.  Raises :class:`FormatError` naming what
    is malformed or truncated.
    """
    ehdr, phdrs, _ = _qemu_dump_headers(data)
    note = next(ph for ph in phdrs if ph.p_type == PT_NOTE)
    loads = [ph for ph in phdrs if ph.p_type == PT_LOAD]
    vaddr_is_paddr = not loads or loads[0].p_vaddr == loads[0].p_paddr
    return DumpInfo(bytes(ehdr.e_ident), ehdr.e_machine, ehdr.e_flags,
                    bytes(data[note.p_offset:note.p_offset + note.p_filesz]), vaddr_is_paddr,
                    tuple((ph.p_paddr, ph.p_memsz) for ph in loads))


def build_vmcore(info: DumpInfo, loads: Sequence[Run]) -> SparseFile:
    """Lay out a live ELF64 core: headers, notes, then page-aligned PT_LOADs.

    Each :class:`~vmcorefs.core.paging.Run` becomes one PT_LOAD with
    ``p_vaddr = run.vaddr``, ``p_paddr = run.paddr`` and
    ``p_filesz = p_memsz = run.size``, served from guest-physical
    ``run.paddr``.  More than 65,534 PT_LOADs use ``PN_XNUM``.
    """
    phnum = 1 + len(loads)
    use_xnum = phnum >= PN_XNUM
    ph_end = Elf64_Ehdr.size() + phnum * Elf64_Phdr.size()
    shoff = ph_end if use_xnum else 0
    notes_off = ph_end + (Elf64_Shdr.size() if use_xnum else 0)
    notes_end = notes_off + len(info.notes)

    ident = bytearray(info.e_ident[:EI_NIDENT].ljust(EI_NIDENT, b"\0"))
    ident[EI_CLASS] = ELFCLASS64
    ident[EI_DATA] = ELFDATA2LSB
    ehdr = Elf64_Ehdr(
        e_ident=bytes(ident), e_type=ET_CORE, e_machine=info.e_machine, e_version=EV_CURRENT, e_entry=0,
        e_phoff=Elf64_Ehdr.size(), e_shoff=shoff, e_flags=info.e_flags, e_ehsize=Elf64_Ehdr.size(),
        e_phentsize=Elf64_Phdr.size(), e_phnum=PN_XNUM if use_xnum else phnum,
        e_shentsize=Elf64_Shdr.size() if use_xnum else 0, e_shnum=1 if use_xnum else 0, e_shstrndx=0,
    )
    n = len(info.notes)
    phdrs = [Elf64_Phdr(p_type=PT_NOTE, p_flags=0, p_offset=notes_off, p_vaddr=0, p_paddr=0,
                        p_filesz=n, p_memsz=n, p_align=0).pack()]
    segments = []
    offset = align_up(notes_end)
    for load in loads:
        phdrs.append(Elf64_Phdr(p_type=PT_LOAD, p_flags=0, p_offset=offset, p_vaddr=load.vaddr,
                                p_paddr=load.paddr, p_filesz=load.size, p_memsz=load.size, p_align=0).pack())
        segments.append(memory(offset, load.paddr, load.size))
        offset = align_up(offset + load.size)
    shdr = Elf64_Shdr(sh_name=0, sh_type=SHT_NULL, sh_flags=0, sh_addr=0, sh_offset=0, sh_size=0,
                      sh_link=0, sh_info=phnum, sh_addralign=0, sh_entsize=0).pack() if use_xnum else b""
    prefix = ehdr.pack() + b"".join(phdrs) + shdr + info.notes
    size = segments[-1].end if segments else len(prefix)
    return SparseFile(prefix, tuple(segments), size)


def build_pmem(blocks: Sequence[tuple[int, int]]) -> SparseFile:
    """Raw guest-physical memory: ``(gpa, size)`` blocks at offset == gpa."""
    segments = tuple(memory(gpa, gpa, size) for gpa, size in sorted(blocks))
    size = max((gpa + n for gpa, n in blocks), default=0)
    return SparseFile(b"", segments, size)
