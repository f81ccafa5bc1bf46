"""kcore layout (kcore_loads, build_kcore) read back with pyelftools."""

from __future__ import annotations

import io

from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment
from paging_support import KiB4, MiB2, PageTables, PhysMem
from unit_support import DATA, fake_mem, read_via_extents

from vmcorefs.core.elf import build_vmcore, parse_qemu_dump
from vmcorefs.core.layout import PAGE_SIZE, memory
from vmcorefs.core.kcore import build_kcore
from vmcorefs.core.paging import Run, clip_runs, walk

PAGE_OFFSET = 0xFFFF_8880_0000_0000
KTEXT = 0xFFFF_FFFF_8000_0000


def test_build_kcore_from_walk() -> None:
    """Page tables -> walk -> clip to RAM -> kcore; every PT_LOAD checked."""
    mem = PhysMem()
    pt = PageTables(mem, table_base=0x7000000)
    pt.map_4k_range(PAGE_OFFSET, 0, 128 << 20)              # direct map of 128 MiB of RAM
    for i in range(8):
        assert pt.map(KTEXT + 0x1000000 + i * MiB2, 0x1000000 + i * MiB2, MiB2)
    assert pt.map(0xFFFF_C900_0000_0000, 0x3000000, KiB4)   # vmalloc
    assert pt.map(0xFFFF_C900_0000_2000, 0xFEBF0000, KiB4)  # ioremap of a PCI BAR: not RAM
    w = walk(mem.read, pt.root, phys_limit=128 << 20)
    runs = clip_runs(w.runs, [(0, 128 << 20)])
    assert runs == [Run(PAGE_OFFSET, 0, 128 << 20), Run(0xFFFF_C900_0000_0000, 0x3000000, KiB4),
                    Run(KTEXT + 0x1000000, 0x1000000, 8 * MiB2)]

    info = parse_qemu_dump((DATA / "qemu72-onebyte-dump.elf").read_bytes())
    sf = build_kcore(info, runs)
    assert sf == build_vmcore(info, runs)
    elf = ELFFile(io.BytesIO(sf.prefix))
    assert elf["e_type"] == "ET_CORE" and elf["e_machine"] == "EM_X86_64"
    assert elf.num_segments() == 1 + len(runs)
    note = elf.get_segment(0)
    assert note["p_type"] == "PT_NOTE" and isinstance(note, NoteSegment)
    assert sf.prefix[note["p_offset"]:note["p_offset"] + note["p_filesz"]] == info.notes
    assert "VMCOREINFO" in [n["n_name"] for n in note.iter_notes()]
    prev_end = note["p_offset"] + note["p_filesz"]
    for i, run in enumerate(runs, 1):
        seg = elf.get_segment(i)
        assert seg["p_type"] == "PT_LOAD"
        assert (seg["p_vaddr"], seg["p_paddr"]) == (run.vaddr, run.paddr)
        assert seg["p_filesz"] == seg["p_memsz"] == run.size
        assert seg["p_offset"] % PAGE_SIZE == 0 and seg["p_offset"] >= prev_end
        prev_end = seg["p_offset"] + seg["p_filesz"]
        # The file serves guest-physical memory at the run's paddr.
        assert sf.segments[i - 1] == memory(seg["p_offset"], run.paddr, run.size)
        for off in (0, run.size // 2, run.size - 64):
            assert read_via_extents(sf, seg["p_offset"] + off, 64) == fake_mem(run.paddr + off, 64)
    assert sf.size == prev_end
