"""vmcore ELF layout (build_vmcore) and QEMU dump parsing (parse_qemu_dump)."""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from unit_support import (
    DATA,
    fake_cpu_notes,
    fake_mem,
    materialise,
    read_via_extents,
    require_tool,
    write_sparse,
)

from vmcorefs.core.elf import (
    MAX_NOTES_SIZE,
    PN_XNUM,
    DumpInfo,
    Elf32_Ehdr,
    Elf32_Phdr,
    Elf64_Ehdr,
    Elf64_Phdr,
    Elf64_Shdr,
    build_vmcore,
    parse_qemu_dump,
)
from vmcorefs.core.layout import PAGE_SIZE, SparseFile, align_up
from vmcorefs.core.paging import Run

# Raw structs, for writing deliberately malformed headers.
ELF32_EHDR, ELF32_PHDR = Elf32_Ehdr.STRUCT, Elf32_Phdr.STRUCT
ELF64_EHDR, ELF64_PHDR, ELF64_SHDR = Elf64_Ehdr.STRUCT, Elf64_Phdr.STRUCT, Elf64_Shdr.STRUCT
from vmcorefs.core.notes import count_cpus, parse_notes, vmcoreinfo_text
from vmcorefs.errors import FormatError

GiB = 1 << 30
EM_X86_64, EM_386, EM_AARCH64 = 62, 3, 183
IDENT64 = b"\x7fELF\x02\x01\x01" + bytes(9)
SAMPLE_72 = DATA / "qemu72-onebyte-dump.elf"
SAMPLE_RESET = DATA / "qemu72-reset-em386-onebyte-dump.elf"


def info_for(ncpus: int, e_machine: int = EM_X86_64, e_flags: int = 0) -> DumpInfo:
    return DumpInfo(IDENT64, e_machine, e_flags, fake_cpu_notes(ncpus), True)


def check_vmcore(sf: SparseFile, info: DumpInfo, loads: list[Run]) -> ELFFile:
    """Everything a core reader relies on, read back with pyelftools."""
    elf = ELFFile(io.BytesIO(sf.prefix))
    assert elf.elfclass == 64 and elf.little_endian
    assert elf["e_type"] == "ET_CORE"
    assert elf.header["e_machine"] in (info.e_machine, _em_name(info.e_machine))
    assert elf["e_flags"] == info.e_flags
    assert elf["e_phoff"] == 64
    assert elf["e_phentsize"] == ELF64_PHDR.size
    phnum = 1 + len(loads)
    assert elf.num_segments() == phnum
    if phnum >= PN_XNUM:
        assert elf["e_phnum"] == PN_XNUM
        assert elf.get_section(0)["sh_info"] == phnum
    else:
        assert elf["e_phnum"] == phnum
        assert elf["e_shoff"] == 0 and elf["e_shnum"] == 0

    note = elf.get_segment(0)
    assert note["p_type"] == "PT_NOTE"
    assert note["p_filesz"] == len(info.notes)
    assert sf.prefix[note["p_offset"]:note["p_offset"] + note["p_filesz"]] == info.notes
    assert note["p_offset"] + note["p_filesz"] == len(sf.prefix)

    prev_end = note["p_offset"] + note["p_filesz"]
    indices = range(1, phnum) if phnum < 1000 else [1, 2, phnum // 2, phnum - 2, phnum - 1]
    for i in indices:
        seg = elf.get_segment(i)
        load = loads[i - 1]
        assert seg["p_type"] == "PT_LOAD"
        assert seg["p_offset"] % PAGE_SIZE == 0
        assert seg["p_filesz"] == seg["p_memsz"] == load.size
        assert seg["p_paddr"] == load.paddr
        assert seg["p_vaddr"] == load.vaddr
        if phnum < 1000:
            assert seg["p_offset"] >= prev_end  # notes first, no overlap
            prev_end = seg["p_offset"] + seg["p_filesz"]
    if loads:
        last = elf.get_segment(phnum - 1)
        assert sf.size == last["p_offset"] + last["p_filesz"]
    # The SparseFile serves exactly what the PT_LOADs announce.
    assert len(sf.segments) == len(loads)
    for i in indices:
        seg, sfseg = elf.get_segment(i), sf.segments[i - 1]
        assert (sfseg.offset, sfseg.src, sfseg.length) == (seg["p_offset"], seg["p_paddr"], seg["p_memsz"])
    return elf


def _em_name(e_machine: int) -> str:
    return {EM_X86_64: "EM_X86_64", EM_386: "EM_386", EM_AARCH64: "EM_AARCH64"}.get(e_machine, "?")


# --- build_vmcore: tables ------------------------------------------------------


LOAD_TABLE = {
    "pc-256M": [Run(0, 0, 0xC0000), Run(0xC0000, 0xC0000, 0x20000),
                Run(0xE0000, 0xE0000, 0x20000), Run(0x100000, 0x100000, 0xFF00000),
                Run(0xFFFC0000, 0xFFFC0000, 0x40000)],
    "pc-5G-above-4G": [Run(0, 0, 0xC0000), Run(0x100000, 0x100000, 0xBFF00000),
                       Run(0x100000000, 0x100000000, 2 * GiB)],
    "old-qemu-vaddr-0": [Run(0, 0x100000, 0x1000), Run(0, 0x200000000, 0x1000)],
    "unaligned-sizes": [Run(0, 0, 1), Run(0x1000, 0x1000, 4097), Run(0x9000, 0x9000, 3)],
    "zero-size-load": [Run(0, 0, 0), Run(0x1000, 0x1000, 0x1000)],
    "top-of-64-bit-space": [Run((1 << 64) - 0x2000, (1 << 64) - 0x2000, 0x2000)],
    "no-loads": [],
}


@pytest.mark.parametrize("name", LOAD_TABLE)
@pytest.mark.parametrize("ncpus", [1, 2, 8])
def test_build_vmcore_table(name: str, ncpus: int) -> None:
    loads = LOAD_TABLE[name]
    info = info_for(ncpus)
    sf = build_vmcore(info, loads)
    check_vmcore(sf, info, loads)
    if not loads:
        assert sf.size == len(sf.prefix)


def test_first_load_follows_notes_page() -> None:
    info = info_for(2)
    sf = build_vmcore(info, [Run(0, 0, 10), Run(0x1000, 0x1000, 10)])
    notes_end = 64 + 3 * 56 + len(info.notes)
    assert len(sf.prefix) == notes_end
    assert [s.offset for s in sf.segments] == [align_up(notes_end), align_up(notes_end) + PAGE_SIZE]
    assert sf.size == align_up(notes_end) + PAGE_SIZE + 10


def test_identity_copied_from_qemu() -> None:
    ident = b"\x7fELF\x01\x01\x01\x03" + bytes(8)  # ELF32, OSABI Linux: class is forced to 64
    info = DumpInfo(ident, EM_AARCH64, 0x5A5A, b"", False)
    sf = build_vmcore(info, [Run(0, 0x40000000, 0x1000)])
    assert sf.prefix[:16] == b"\x7fELF\x02\x01\x01\x03" + bytes(8)
    elf = check_vmcore(sf, info, [Run(0, 0x40000000, 0x1000)])
    assert elf["e_flags"] == 0x5A5A


# --- build_vmcore: properties ----------------------------------------------------


@st.composite
def load_lists(draw: st.DrawFn, min_size: int = 1, max_size: int = 200,
               max_gap: int = 1 << 36, max_len: int = 1 << 34) -> list[Run]:
    n = draw(st.integers(min_size, max_size))
    addr = draw(st.integers(0, 1 << 40))
    same_vaddr = draw(st.booleans())
    loads = []
    for _ in range(n):
        size = draw(st.integers(1, max_len))
        loads.append(Run(addr if same_vaddr else 0, addr, size))
        addr += size + draw(st.integers(0, max_gap))
    return loads


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ncpus=st.integers(1, 8), loads=load_lists(), vmcoreinfo=st.booleans(),
       e_machine=st.sampled_from([EM_X86_64, EM_386, EM_AARCH64]))
def test_build_vmcore_properties(ncpus: int, loads: list[Run], vmcoreinfo: bool,
                                 e_machine: int) -> None:
    notes = fake_cpu_notes(ncpus, None if not vmcoreinfo else b"OSRELEASE=6.1.0\nPAGESIZE=4096\n")
    info = DumpInfo(IDENT64, e_machine, 0, notes, True)
    sf = build_vmcore(info, loads)
    elf = check_vmcore(sf, info, loads)

    # pyelftools sees the notes QEMU gave us.
    note_seg = elf.get_segment(0)
    assert isinstance(note_seg, NoteSegment)
    got: list[tuple[object, object]] = [(n["n_name"], n["n_type"]) for n in note_seg.iter_notes()]
    assert got.count(("CORE", "NT_PRSTATUS")) == ncpus
    assert got.count(("QEMU", 0)) == ncpus
    assert (("VMCOREINFO", 0) in got) == vmcoreinfo

    # Round trip through our own parser.
    back = parse_qemu_dump(sf.prefix)
    assert back.notes == info.notes
    assert (back.e_machine, back.e_flags, back.e_ident) == (e_machine, 0, IDENT64)
    assert back.vaddr_is_paddr == (loads[0].vaddr == loads[0].paddr)
    assert count_cpus(parse_notes(back.notes)) == ncpus


@settings(max_examples=30, deadline=None)
@given(ncpus=st.integers(1, 4), loads=load_lists(max_size=6, max_gap=1 << 33, max_len=9000))
def test_materialised_vmcore_reads_back(ncpus: int, loads: list[Run]) -> None:
    """A small vmcore written out byte by byte: PT_LOAD data is the guest's memory."""
    info = info_for(ncpus)
    sf = build_vmcore(info, loads)
    whole = materialise(sf)
    elf = ELFFile(io.BytesIO(whole))
    for seg, load in zip(list(elf.iter_segments())[1:], loads):
        assert seg.data() == fake_mem(load.paddr, load.size)
    gap_bytes = whole[len(sf.prefix):sf.segments[0].offset]
    assert gap_bytes == bytes(len(gap_bytes))
    # What the FUSE adapter serves (via extents) is this file.
    assert read_via_extents(sf, 0, sf.size) == whole
    assert read_via_extents(sf, 100, 10000) == whole[100:10100]


# --- PN_XNUM ----------------------------------------------------------------


@pytest.fixture(scope="module")
def xnum_case() -> tuple[DumpInfo, list[Run], SparseFile]:
    info = info_for(2)
    loads = [Run(i * 0x2000, i * 0x2000, 1 + i % 3) for i in range(PN_XNUM - 1)]
    return info, loads, build_vmcore(info, loads)


def test_pn_xnum_header(xnum_case: tuple[DumpInfo, list[Run], SparseFile]) -> None:
    info, loads, sf = xnum_case
    phnum = len(loads) + 1
    assert phnum == PN_XNUM
    ehdr = ELF64_EHDR.unpack_from(sf.prefix)
    assert ehdr[10] == PN_XNUM  # e_phnum
    shoff, shentsize, shnum, shstrndx = ehdr[6], ehdr[11], ehdr[12], ehdr[13]
    assert (shoff, shentsize, shnum, shstrndx) == (64 + phnum * 56, ELF64_SHDR.size, 1, 0)
    shdr = ELF64_SHDR.unpack_from(sf.prefix, shoff)
    assert shdr[1] == 0 and shdr[7] == phnum  # SHT_NULL, sh_info = real count
    check_vmcore(sf, info, loads)
    # Every PT_LOAD, checked without pyelftools' per-segment cost.
    for i, load in enumerate(loads, start=1):
        p_type, _f, off, vaddr, paddr, filesz, memsz, _a = ELF64_PHDR.unpack_from(sf.prefix, 64 + i * 56)
        assert (p_type, vaddr, paddr, filesz, memsz) == (1, load.vaddr, load.paddr, load.size, load.size)
        assert off % PAGE_SIZE == 0 and off == sf.segments[i - 1].offset
    back = parse_qemu_dump(sf.prefix)
    assert back.notes == info.notes


def test_one_below_pn_xnum_needs_no_section_header() -> None:
    info = info_for(1)
    loads = [Run(i * 0x1000, i * 0x1000, 0x1000) for i in range(PN_XNUM - 2)]
    sf = build_vmcore(info, loads)
    ehdr = ELF64_EHDR.unpack_from(sf.prefix)
    assert ehdr[10] == PN_XNUM - 1 and ehdr[6] == 0 and ehdr[12] == 0
    assert ELFFile(io.BytesIO(sf.prefix)).num_segments() == PN_XNUM - 1


# --- readelf / eu-readelf on materialised files -----------------------------------------


def _readelf_loads(out: str) -> list[tuple[int, int, int, int, int]]:
    """(offset, vaddr, paddr, filesz, memsz) of each LOAD line of ``readelf -lW``."""
    rows = []
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD":
            rows.append(tuple(int(x, 16) for x in fields[1:6]))
    return rows  # type: ignore[return-value]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower() and "error" not in proc.stderr.lower(), proc.stderr
    return proc


READELF_CASES = {
    "real-qemu72-notes-low-and-high-ram": (
        None, [Run(0, 0, 0x3000), Run(0x100000, 0x100000, 0x1234),
               Run(0xFFFC0000, 0xFFFC0000, 0x40), Run(0x100000000, 0x100000000, 0x2001)]),
    "one-cpu-old-vaddr": (1, [Run(0, 0x1000, 0x1000), Run(0, 0x7_0000_0000, 5)]),
    "eight-cpus-many-loads": (8, [Run(i * 0x10000, i * 0x10000 + (i > 20) * 8 * GiB, 100 + i)
                                  for i in range(40)]),
}


@pytest.mark.parametrize("tool", ["/usr/bin/readelf", "/usr/bin/eu-readelf"])
@pytest.mark.parametrize("case", READELF_CASES)
def test_readelf_accepts_vmcore(tool: str, case: str, tmp_path: Path) -> None:
    exe = require_tool(tool)
    ncpus, loads = READELF_CASES[case]
    info = parse_qemu_dump(SAMPLE_72.read_bytes()) if ncpus is None else info_for(ncpus)
    ncpus = ncpus or 2
    sf = build_vmcore(info, loads)
    path = tmp_path / "vmcore"
    write_sparse(sf, path)
    assert path.stat().st_size == sf.size

    out = _run(exe, "-lnW", str(path)).stdout
    expected = [(s.offset, ld.vaddr, ld.paddr, ld.size, ld.size) for s, ld in zip(sf.segments, loads)]
    assert _readelf_loads(out) == expected
    if exe.endswith("eu-readelf"):
        assert out.count("PRSTATUS") == ncpus
    else:
        assert out.count("NT_PRSTATUS") == ncpus
        assert "There are %d program headers, starting at offset 64" % (len(loads) + 1) in out
    assert out.count("QEMU") >= ncpus
    assert ("VMCOREINFO" in out) == (vmcoreinfo_text(parse_notes(info.notes)) is not None)
    # The bytes at each PT_LOAD are the guest's.
    with open(path, "rb") as f:
        for seg in sf.segments:
            f.seek(seg.offset)
            assert f.read(seg.length) == fake_mem(seg.src, seg.length)


@pytest.mark.parametrize("tool", ["/usr/bin/readelf", "/usr/bin/eu-readelf"])
def test_readelf_reads_pn_xnum(tool: str, tmp_path: Path,
                               xnum_case: tuple[DumpInfo, list[Run], SparseFile]) -> None:
    exe = require_tool(tool)
    _info, loads, sf = xnum_case
    path = tmp_path / "vmcore"
    with open(path, "wb") as f:  # headers only; the memory stays a hole
        f.write(sf.prefix)
        f.truncate(sf.size)
    out = _run(exe, "-lW", str(path)).stdout
    rows = _readelf_loads(out)
    assert len(rows) == len(loads) == PN_XNUM - 1
    assert rows[-1] == (sf.segments[-1].offset, loads[-1].vaddr, loads[-1].paddr,
                        loads[-1].size, loads[-1].size)


# --- parse_qemu_dump: real QEMU 7.2 samples ---------------------------------------


def test_real_qemu72_dump() -> None:
    data = SAMPLE_72.read_bytes()
    info = parse_qemu_dump(data)
    assert info.e_machine == EM_X86_64
    assert info.e_flags == 0
    assert info.vaddr_is_paddr is True
    assert info.e_ident[:7] == b"\x7fELF\x02\x01\x01"
    notes = parse_notes(info.notes)
    names = [(n.name, n.type) for n in notes]
    assert names == [("CORE", 1), ("CORE", 1), ("QEMU", 0), ("QEMU", 0), ("VMCOREINFO", 0)]
    assert count_cpus(notes) == 2
    text = vmcoreinfo_text(notes)
    assert text is not None and text.startswith("OSRELEASE=")
    # Same PT_NOTE bytes as pyelftools finds (QEMU 7.2 puts section headers first).
    elf = ELFFile(io.BytesIO(data))
    (note_seg,) = [s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"]
    assert note_seg.data() == info.notes
    assert elf["e_shoff"] == 64 and elf["e_phoff"] > 64


def test_real_qemu72_dump_at_reset_is_em386() -> None:
    """Captured at reset (real mode): EM_386 with a 32-bit NT_PRSTATUS, in ELF64."""
    info = parse_qemu_dump(SAMPLE_RESET.read_bytes())
    assert info.e_machine == EM_386
    assert info.e_ident[4] == 2  # ELFCLASS64 (pc.bios ends at 4 GiB)
    notes = parse_notes(info.notes)
    assert [(n.name, n.type, len(n.desc)) for n in notes] == [("CORE", 1, 144), ("QEMU", 0, 440)]
    assert vmcoreinfo_text(notes) is None
    assert info.vaddr_is_paddr is True


@pytest.mark.parametrize("sample", [SAMPLE_72, SAMPLE_RESET], ids=lambda p: p.name)
def test_vmcore_from_real_sample(sample: Path) -> None:
    info = parse_qemu_dump(sample.read_bytes())
    loads = [Run(0, 0, 0xC0000), Run(0x100000000, 0x100000000, GiB)]
    sf = build_vmcore(info, loads)
    check_vmcore(sf, info, loads)
    again = parse_qemu_dump(sf.prefix)
    assert (again.notes, again.e_machine, again.e_flags) == (info.notes, info.e_machine, info.e_flags)


# --- parse_qemu_dump: synthetic and malformed -------------------------------------


def elf64(phdrs: list[tuple[int, ...]], *, tail: bytes = b"", e_type: int = 4, e_machine: int = EM_X86_64,
          ident: bytes = IDENT64, phoff: int = 64, phentsize: int = 56, phnum: int | None = None,
          shoff: int = 0) -> bytes:
    """An ELF64 header + program headers (p_type, p_offset, p_vaddr, p_paddr, p_filesz) + tail."""
    n = len(phdrs) if phnum is None else phnum
    eh = ELF64_EHDR.pack(ident, e_type, e_machine, 1, 0, phoff, shoff, 0, 64, phentsize, n, 64, 0, 0)
    ph = b"".join(ELF64_PHDR.pack(t, 0, off, va, pa, sz, sz, 0) for t, off, va, pa, sz in phdrs)
    return eh + ph + tail


NOTES = fake_cpu_notes(1)
NOTE_OFF = 64 + 2 * 56
VALID = elf64([(4, NOTE_OFF, 0, 0, len(NOTES)), (1, 0x2000, 0x100000, 0x100000, 1)], tail=NOTES)


def elf32(notes: bytes, vaddr: int, paddr: int) -> bytes:
    phoff, noff = 52, 52 + 2 * 32
    eh = ELF32_EHDR.pack(b"\x7fELF\x01\x01\x01" + bytes(9), 4, EM_386, 1, 0, phoff, 0, 0, 52, 32, 2, 0, 0, 0)
    ph = ELF32_PHDR.pack(4, noff, 0, 0, len(notes), len(notes), 0, 0)
    ph += ELF32_PHDR.pack(1, 0x1000, vaddr, paddr, 1, 1, 0, 0)
    return eh + ph + notes


def test_valid_synthetic_dump() -> None:
    info = parse_qemu_dump(VALID)
    assert info.notes == NOTES and info.vaddr_is_paddr and info.e_machine == EM_X86_64


def test_elf32_dump_keeps_notes_verbatim() -> None:
    notes = fake_cpu_notes(1)
    info = parse_qemu_dump(elf32(notes, 0x100000, 0x100000))
    assert (info.notes, info.e_machine, info.vaddr_is_paddr) == (notes, EM_386, True)
    assert parse_qemu_dump(elf32(notes, 0, 0x100000)).vaddr_is_paddr is False


def test_old_qemu_vaddr_zero() -> None:
    data = elf64([(4, NOTE_OFF, 0, 0, len(NOTES)), (1, 0x2000, 0, 0x100000, 1)], tail=NOTES)
    assert parse_qemu_dump(data).vaddr_is_paddr is False


def test_first_pt_note_and_first_pt_load_win() -> None:
    off = 64 + 4 * 56
    data = elf64([(1, 0x2000, 0, 0x5000, 1), (4, off, 0, 0, 12), (4, off + 12, 0, 0, 12),
                  (1, 0x3000, 0x6000, 0x6000, 1)], tail=b"A" * 12 + b"B" * 12)
    info = parse_qemu_dump(data)
    assert info.notes == b"A" * 12 and info.vaddr_is_paddr is False


def test_empty_pt_note() -> None:
    assert parse_qemu_dump(elf64([(4, 0, 0, 0, 0)])).notes == b""


def _set(data: bytes, fmt: str, offset: int, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _xnum(count: int, shoff: int | None) -> bytes:
    data = elf64([(4, NOTE_OFF, 0, 0, len(NOTES)), (1, 0x2000, 0, 0, 1)], tail=NOTES,
                 phnum=PN_XNUM, shoff=shoff if shoff is not None else len(VALID))
    return data + ELF64_SHDR.pack(0, 0, 0, 0, 0, 0, 0, count, 0, 0)


MALFORMED = {
    "empty": b"",
    "magic-only": b"\x7fELF",
    "ident-only": IDENT64,
    "bad-magic": b"\x7fELG" + VALID[4:],
    "big-endian": VALID[:5] + b"\x02" + VALID[6:],
    "elfclass-none": VALID[:4] + b"\x00" + VALID[5:],
    "elfclass-3": VALID[:4] + b"\x03" + VALID[5:],
    "truncated-ehdr": VALID[:40],
    "truncated-phdrs": VALID[:64 + 56 + 10],
    "truncated-notes": VALID[:-1],
    "not-core": _set(VALID, "<H", 16, 2),
    "bad-phentsize": _set(VALID, "<H", 54, 32),
    "zero-phnum": _set(VALID, "<H", 56, 0),
    "phnum-past-end": _set(VALID, "<H", 56, 1000),
    "phoff-huge": _set(VALID, "<Q", 32, (1 << 64) - 1),
    "note-offset-out-of-bounds": _set(VALID, "<Q", 64 + 8, 1 << 40),
    "note-size-out-of-bounds": _set(VALID, "<Q", 64 + 32, len(NOTES) + 1),
    "note-size-absurd": _set(VALID, "<Q", 64 + 32, (1 << 64) - 1),
    "note-size-over-max": elf64([(4, 0, 0, 0, MAX_NOTES_SIZE + 1)]) + bytes(16),
    "no-pt-note": elf64([(1, 0x1000, 0, 0, 1)]),
    "xnum-without-shdr": _xnum(2, 1 << 20),
    "xnum-shoff-absurd": _xnum(2, (1 << 64) - 1),
    "xnum-count-zero": _xnum(0, None),
    "xnum-count-huge": _xnum(0xFFFFFFFF, None),
    "xnum-in-elf32": _set(elf32(NOTES, 0, 0), "<H", 44, PN_XNUM),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_dumps_raise_format_error(name: str) -> None:
    with pytest.raises(FormatError):
        parse_qemu_dump(MALFORMED[name])


def test_valid_xnum_dump_parses() -> None:
    assert parse_qemu_dump(_xnum(2, None)).notes == NOTES


# --- parse_qemu_dump: fuzz ----------------------------------------------------------


def _parse_or_format_error(data: bytes) -> None:
    try:
        info = parse_qemu_dump(data)
    except FormatError:
        return
    assert isinstance(info, DumpInfo)
    assert len(info.notes) <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_format_error(data: bytes) -> None:
    _parse_or_format_error(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300).map(lambda b: b"\x7fELF" + b))
def test_random_elf_magic_only_format_error(data: bytes) -> None:
    _parse_or_format_error(data)


BASES = [VALID, SAMPLE_72.read_bytes(), _xnum(2, None), elf32(NOTES, 0, 0)]


@settings(max_examples=250, deadline=None)
@given(base=st.sampled_from(BASES), data=st.data())
def test_mutated_headers_only_format_error(base: bytes, data: st.DataObject) -> None:
    b = bytearray(base)
    header_span = min(len(b), 0x200)  # ELF header, program headers, start of notes
    for _ in range(data.draw(st.integers(1, 6))):
        if data.draw(st.booleans()):
            b[data.draw(st.integers(0, header_span - 1))] = data.draw(st.integers(0, 255))
        else:
            pos = data.draw(st.integers(0, header_span - 8))
            b[pos:pos + 8] = data.draw(st.sampled_from(
                [bytes(8), b"\xff" * 8, struct.pack("<Q", 1 << 63), struct.pack("<Q", PN_XNUM),
                 struct.pack("<Q", data.draw(st.integers(0, (1 << 64) - 1)))]))
    if data.draw(st.booleans()):
        del b[data.draw(st.integers(0, len(b))):]
    assume(bytes(b) != base)
    _parse_or_format_error(bytes(b))
