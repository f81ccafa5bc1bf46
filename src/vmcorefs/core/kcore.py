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
bounded walk, runs clipped to RAM (:func:`~vmcorefs.core.paging.clip_runs`),
then the layout.  Both dispatch on the dump's ``e_machine``: x86
(``EM_X86_64``, ``EM_386``) walks with :func:`vmcorefs.core.paging.walk`,
arm64 (``EM_AARCH64``) with :func:`vmcorefs.core.paging_arm64.walk`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from vmcorefs.core import paging_arm64
from vmcorefs.core.elf import DumpInfo, build_vmcore
from vmcorefs.core.layout import SparseFile
from vmcorefs.core.notes import parse_notes, qemu_x86_cpu_states
from vmcorefs.core.paging import CR4_LA57, ReadPhys, Run, clip_runs, cr3_to_root, kernel_root_from_vmcoreinfo, walk
from vmcorefs.errors import FormatError

#: ``<elf.h>`` machines whose kernel page tables are walked.
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183

#: Bound on kcore PT_LOADs (a real kernel needs a few thousand).
KCORE_MAX_RUNS = 1 << 16


def build_kcore(info: DumpInfo, runs: Iterable[Run]) -> SparseFile:
    """Lay out a kcore: QEMU's notes, then one page-aligned PT_LOAD per run."""
    return build_vmcore(info, list(runs))


@dataclass(frozen=True)
class PageTableRoot:
    """Where a guest kernel's page tables start, and how to walk them."""

    #: The dump's ``e_machine`` (:data:`EM_X86_64`, :data:`EM_386` or :data:`EM_AARCH64`).
    machine: int
    #: Guest-physical address of the top-level table (x86: the PML4/PML5
    #: of CR3; arm64: TTBR1's table, ``swapper_pg_dir``).
    addr: int
    #: x86: paging levels, 4 or 5.  arm64: ``va_bits`` of the kernel half
    #: (``64 - TCR_EL1.T1SZ``, 48 for Debian's kernels).
    size: int


def page_table_root(vmcoreinfo: Mapping[str, str] | None, info: DumpInfo) -> PageTableRoot:
    """The kernel's top-level page table for the dump ``info`` describes.

    x86: from VMCOREINFO's ``init_top_pgt`` when the guest published
    VMCOREINFO, else the CR3 of a vCPU that was in kernel mode (the kernel
    half is the same in every address space; QEMU's ``QEMU`` notes).
    arm64: from VMCOREINFO only (``SYMBOL(swapper_pg_dir)`` -
    ``NUMBER(kimage_voffset)``, ``NUMBER(TCR_EL1_T1SZ)``): QEMU's aarch64
    notes carry no TTBR1_EL1.  Raises :class:`FormatError` saying why there
    is none (also for another ``e_machine``).
    """
    machine = info.e_machine
    if machine == EM_AARCH64:
        if vmcoreinfo is None:
            raise FormatError("no VMCOREINFO: an arm64 guest's page-table root (TTBR1) is not in QEMU's notes")
        addr, va_bits = paging_arm64.kernel_root_from_vmcoreinfo(vmcoreinfo)
        return PageTableRoot(machine, addr, va_bits)
    if machine not in (EM_X86_64, EM_386):
        raise FormatError(f"no page-table walker for ELF machine {machine}")
    if vmcoreinfo is not None:
        return PageTableRoot(machine, *kernel_root_from_vmcoreinfo(vmcoreinfo))
    for cpu in qemu_x86_cpu_states(parse_notes(info.notes)):
        if cpu.in_kernel and cpu.cr3:
            return PageTableRoot(machine, cr3_to_root(cpu.cr3), 5 if cpu.cr4 & CR4_LA57 else 4)
    raise FormatError("no VMCOREINFO and no vCPU in kernel mode to take CR3 from")


@dataclass(frozen=True)
class KernelView:
    """Result of :func:`kernel_view`: the ``kcore`` layout and how the walk went."""

    file: SparseFile
    #: True when the walk stopped at its bounds (the layout holds what was found).
    truncated: bool


def kernel_view(read_phys: ReadPhys, info: DumpInfo, root: PageTableRoot,
                ram: Sequence[tuple[int, int]]) -> KernelView:
    """The kcore of a guest: its kernel page tables from ``root`` (from
    :func:`page_table_root`) walked through ``read_phys(gpa, length) ->
    bytes``, coalesced, clipped to the ``(gpa, size)`` blocks of ``ram``,
    with ``info``'s notes.

    Cost: bounded by the walkers' defaults and ``KCORE_MAX_RUNS`` runs
    (~50 ms for a 256 MiB x86 guest, ~0.2 s for a 512 MiB arm64 one).
    """
    phys_limit = max((gpa + size for gpa, size in ram), default=0)
    if root.machine == EM_AARCH64:
        result = paging_arm64.walk(read_phys, root.addr, va_bits=root.size, phys_limit=phys_limit,
                                   max_runs=KCORE_MAX_RUNS)
    else:
        result = walk(read_phys, root.addr, levels=root.size, phys_limit=phys_limit, max_runs=KCORE_MAX_RUNS)
    runs = clip_runs(result.runs, ram)
    return KernelView(build_kcore(info, runs), result.truncated)


def gdb_program(machine: int) -> str:
    """The gdb to suggest for a guest of ELF ``machine``: ``gdb-multiarch``
    for arm64 (vmcorefs runs on x86-64 hosts too), else ``gdb``."""
    return "gdb-multiarch" if machine == EM_AARCH64 else "gdb"


def gdb_script(kcore_path: str, kernel_offset: int, gdb: str = "gdb") -> str:
    """The ``gdbinit`` served next to ``kcore``: load the guest's vmlinux
    (gdb's exec file) relocated by the KASLR offset, then open ``kcore``.

    gdb reads core memory by ``p_vaddr`` and does no page-table walk, so it
    needs ``kcore`` (kernel-virtual PT_LOADs), not ``vmcore``.  Usage
    (``gdb-multiarch`` for a guest of another architecture)::

        gdb -q VMLINUX -x MOUNTPOINT/gdbinit
    """
    return f"""\
# vmcorefs: gdb on the live kernel of this guest (KASLR offset {kernel_offset:#x}).
# usage: {gdb} -q VMLINUX -x {kcore_path.rsplit("/", 1)[0]}/gdbinit
set confirm off
set pagination off
python
import gdb
_vmlinux = gdb.current_progspace().filename
if not _vmlinux:
    raise gdb.GdbError("vmcorefs: start gdb with the guest's vmlinux: {gdb} -q VMLINUX -x THIS_FILE")
gdb.execute("symbol-file", to_string=True)
gdb.execute("symbol-file -o {kernel_offset:#x} " + _vmlinux, to_string=True)
gdb.execute("core-file {kcore_path}")
end
"""
