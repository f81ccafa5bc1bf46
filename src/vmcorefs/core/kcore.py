"""ELF core layout of ``kcore``: the guest kernel's virtual address space.

Like Linux's ``/proc/kcore``, each ``PT_LOAD`` describes kernel-virtual
memory: ``p_vaddr`` is where the kernel sees it, ``p_paddr`` the
guest-physical address behind it.  The file layout is exactly that of
``vmcore`` (:func:`vmcorefs.core.elf.build_vmcore`)::

    0                       Elf64_Ehdr
    64                      Elf64_Phdr[1 + len(runs)]
                              [0]  PT_NOTE    the notes QEMU wrote
                              [1:] PT_LOAD    one per Run: p_vaddr = run.vaddr,
                                              p_paddr = run.paddr,
                                              p_filesz = p_memsz = run.size
    notes, pad to 4 KiB
    PT_LOAD data            each p_offset page-aligned

Each :class:`~vmcorefs.core.paging.Run` maps one physically contiguous range,
so every ``PT_LOAD`` has a single ``p_paddr`` and its file data is served
from guest-physical memory like a ``vmcore`` segment.  :func:`kernel_view`
does the whole job: the page-table root (:func:`page_table_root`), a
bounded :func:`~vmcorefs.core.paging.walk`, runs clipped to RAM
(:func:`~vmcorefs.core.paging.clip_runs`), then the layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from vmcorefs.core.elf import DumpInfo, build_vmcore
from vmcorefs.core.layout import SparseFile
from vmcorefs.core.notes import X86CPUState
from vmcorefs.core.paging import ReadPhys, Run, clip_runs, cr3_to_root, kernel_root_from_vmcoreinfo, walk
from vmcorefs.errors import FormatError

#: Bound on kcore PT_LOADs (a real kernel needs a few thousand).
KCORE_MAX_RUNS = 1 << 16
#: CR4.LA57: 5-level paging.
CR4_LA57 = 1 << 12


def build_kcore(info: DumpInfo, runs: Iterable[Run]) -> SparseFile:
    """Lay out a kcore: QEMU's notes, then one page-aligned PT_LOAD per run."""
    return build_vmcore(info, list(runs))


def page_table_root(vmcoreinfo: Mapping[str, str] | None, cpus: Sequence[X86CPUState]) -> tuple[int, int]:
    """``(guest-physical address of the kernel's top-level table, levels)``.

    From VMCOREINFO's ``init_top_pgt`` when the guest published VMCOREINFO,
    else the CR3 of a vCPU that was in kernel mode (the kernel half is the
    same in every address space).  Raises :class:`FormatError` saying why
    there is none.
    """
    if vmcoreinfo is not None:
        return kernel_root_from_vmcoreinfo(vmcoreinfo)
    for cpu in cpus:
        if cpu.in_kernel and cpu.cr3:
            return cr3_to_root(cpu.cr3), 5 if cpu.cr4 & CR4_LA57 else 4
    raise FormatError("no VMCOREINFO and no vCPU in kernel mode to take CR3 from")


@dataclass(frozen=True)
class KernelView:
    """Result of :func:`kernel_view`: the ``kcore`` layout and how the walk went."""

    file: SparseFile
    #: True when the walk stopped at its bounds (the layout holds what was found).
    truncated: bool


def kernel_view(read_phys: ReadPhys, info: DumpInfo, root: int, levels: int,
                ram: Sequence[tuple[int, int]]) -> KernelView:
    """The kcore of a guest: its kernel page tables from ``root`` (``levels``
    4 or 5) walked through ``read_phys(gpa, length) -> bytes``, coalesced,
    clipped to the ``(gpa, size)`` blocks of ``ram``, with ``info``'s notes.

    Cost: bounded by :func:`~vmcorefs.core.paging.walk`'s defaults and
    ``KCORE_MAX_RUNS`` runs (~50 ms for a 256 MiB guest).
    """
    phys_limit = max((gpa + size for gpa, size in ram), default=0)
    result = walk(read_phys, root, levels=levels, phys_limit=phys_limit, max_runs=KCORE_MAX_RUNS)
    runs = clip_runs(result.runs, ram)
    return KernelView(build_kcore(info, runs), result.truncated)


def gdb_script(kcore_path: str, kernel_offset: int) -> str:
    """The ``gdbinit`` served next to ``kcore``: load the guest's vmlinux
    (gdb's exec file) relocated by the KASLR offset, then open ``kcore``.

    gdb reads core memory by ``p_vaddr`` and does no page-table walk, so it
    needs ``kcore`` (kernel-virtual PT_LOADs), not ``vmcore``.  Usage::

        gdb -q VMLINUX -x MOUNTPOINT/gdbinit
    """
    return f"""\
# vmcorefs: gdb on the live kernel of this guest (KASLR offset {kernel_offset:#x}).
# usage: gdb -q VMLINUX -x {kcore_path.rsplit("/", 1)[0]}/gdbinit
set confirm off
set pagination off
python
import gdb
_vmlinux = gdb.current_progspace().filename
if not _vmlinux:
    raise gdb.GdbError("vmcorefs: start gdb with the guest's vmlinux: gdb -q VMLINUX -x THIS_FILE")
gdb.execute("symbol-file", to_string=True)
gdb.execute("symbol-file -o {kernel_offset:#x} " + _vmlinux, to_string=True)
gdb.execute("core-file {kcore_path}")
end
"""
