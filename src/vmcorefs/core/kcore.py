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
