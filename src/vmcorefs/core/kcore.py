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
from guest-physical memory like a ``vmcore`` segment
(``Segment(p_offset, run.paddr, run.size)``).  Runs come from
:func:`vmcorefs.core.paging.walk`, usually passed through
:func:`~vmcorefs.core.paging.clip_runs` so that only RAM is exposed.
"""

from __future__ import annotations

from collections.abc import Iterable

from vmcorefs.core.elf import DumpInfo, LoadRange, build_vmcore
from vmcorefs.core.layout import SparseFile
from vmcorefs.core.paging import Run


def kcore_loads(runs: Iterable[Run]) -> list[LoadRange]:
    """One PT_LOAD per run: virtual ``p_vaddr``, physical ``p_paddr``."""
    return [LoadRange(run.paddr, run.vaddr, run.size) for run in runs]


def build_kcore(info: DumpInfo, runs: Iterable[Run]) -> SparseFile:
    """Lay out a kcore: QEMU's notes, then one page-aligned PT_LOAD per run."""
    return build_vmcore(info, kcore_loads(runs))


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
