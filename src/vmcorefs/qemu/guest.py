"""A QEMU guest as vmcorefs sees it: memory map, notes, run state.

:meth:`Guest.snapshot` is the one place where a layout is computed (at each
``open()``): ``info mtree -f`` and ``gpa2hva`` give the blocks QEMU's dump
would write, ``/proc/PID/maps`` says how to read them, and a
``dump-guest-memory`` of one byte (``paging=false``, ``begin``/``length``)
into a memfd passed with ``getfd`` gives QEMU's own notes for this instant
(vCPU registers, VMCOREINFO) and its ELF identity.  Reads never need QMP.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from vmcorefs.core.elf import DumpInfo, LoadRange, build_pmem, build_vmcore, parse_qemu_dump
from vmcorefs.core.kcore import build_kcore
from vmcorefs.core.layout import SparseFile
from vmcorefs.core.memmap import (
    FlatRange,
    RamBlock,
    guest_phys_blocks,
    parse_gpa2hva,
    parse_mtree_flat,
)
from vmcorefs.core.notes import (
    count_cpus,
    parse_notes,
    parse_vmcoreinfo,
    qemu_x86_cpu_states,
    vmcoreinfo_text,
)
from vmcorefs.core.paging import clip_runs, cr3_to_root, kernel_root_from_vmcoreinfo, walk
from vmcorefs.errors import FormatError, GuestMemoryError, QMPError
from vmcorefs.qemu.memory import ProcessMemory, Source, read_into
from vmcorefs.qemu.monitor import Monitor

log = logging.getLogger(__name__)

NOTES_FDNAME = "vmcorefs-notes"
#: Bound on kcore PT_LOADs (a real kernel needs a few thousand).
KCORE_MAX_RUNS = 1 << 16
CR4_LA57 = 1 << 12
#: Bound on what we read back of the 1-byte dump (headers + notes + 1 byte).
MAX_SAMPLE_DUMP = 80 << 20


@dataclass
class Snapshot:
    """One consistent layout: what an open handle serves until it closes.

    ``kcore`` (the kernel-virtual view) costs a page-table walk, so it is
    computed on first use by :meth:`Guest.kcore` and kept here.
    """

    taken: float
    blocks: tuple[RamBlock, ...]
    sources: tuple[Source, ...]
    dump: DumpInfo
    vmcore: SparseFile
    pmem: SparseFile
    vmcoreinfo: str | None
    _starts: tuple[int, ...] = field(repr=False, compare=False)
    kcore: SparseFile | None = field(default=None, repr=False, compare=False)
    kcore_error: str | None = field(default=None, repr=False, compare=False)

    @cached_property
    def vmcoreinfo_fields(self) -> dict[str, str] | None:
        """VMCOREINFO as ``KEY -> VALUE`` (None when the guest published none)."""
        return None if self.vmcoreinfo is None else parse_vmcoreinfo(self.vmcoreinfo)

    @cached_property
    def kernel_offset(self) -> int | None:
        """KASLR offset of the kernel text (VMCOREINFO ``KERNELOFFSET``)."""
        value = (self.vmcoreinfo_fields or {}).get("KERNELOFFSET")
        try:
            return int(value, 16) if value else None
        except ValueError:
            return None

    def source_for(self, gpa: int) -> Source:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa >= self.blocks[i].end:
            raise GuestMemoryError("no RAM block", gpa)
        return self.sources[i]


class Guest:
    """The running QEMU behind a QMP monitor."""

    def __init__(self, monitor: Monitor, memory_mode: str = "auto") -> None:
        self.monitor = monitor
        self.memory = ProcessMemory(monitor.pid, memory_mode)
        self._dump_lock = asyncio.Lock()

    async def flat_ranges(self) -> list[FlatRange]:
        text = await self.monitor.hmp("info mtree -f")
        return parse_mtree_flat(text)

    async def ram_blocks(self) -> list[RamBlock]:
        """The guest-physical blocks ``dump-guest-memory paging=false`` writes."""
        pairs: list[tuple[FlatRange, int]] = []
        for fr in await self.flat_ranges():
            if not fr.dumped:
                continue
            answer = await self.monitor.gpa2hva(fr.start)
            try:
                hva = parse_gpa2hva(answer)
            except FormatError:
                continue  # not RAM after all (e.g. a read-only i/o region)
            pairs.append((fr, hva))
        return guest_phys_blocks(pairs)

    async def dump_info(self, blocks: list[RamBlock]) -> DumpInfo:
        """QEMU's ELF identity and notes, from a dump of one byte of RAM."""
        if not blocks:
            raise QMPError("the guest has no RAM to dump", "dump-guest-memory")
        async with self._dump_lock:
            fd = os.memfd_create("vmcorefs-notes", os.MFD_CLOEXEC)
            try:
                self.monitor.send_fd(fd)
                await self.monitor.execute("getfd", {"fdname": NOTES_FDNAME})
                await self.monitor.execute("dump-guest-memory", {
                    "paging": False, "protocol": f"fd:{NOTES_FDNAME}",
                    "begin": blocks[0].gpa, "length": 1,
                })
                size = os.fstat(fd).st_size
                if size > MAX_SAMPLE_DUMP:
                    raise FormatError(f"QEMU's 1-byte dump is {size} bytes")
                data = os.pread(fd, size, 0)
            finally:
                os.close(fd)
        return parse_qemu_dump(data)

    async def snapshot(self) -> Snapshot:
        """Compute the current layout of ``vmcore`` and ``pmem``."""
        blocks = await self.ram_blocks()
        dump = await self.dump_info(blocks)
        sources = self.memory.sources(blocks)
        loads = [LoadRange(b.gpa, b.gpa if dump.vaddr_is_paddr else 0, b.size) for b in blocks]
        text = vmcoreinfo_text(parse_notes(dump.notes))
        return Snapshot(
            taken=time.monotonic(),
            blocks=tuple(blocks),
            sources=tuple(sources),
            dump=dump,
            vmcore=build_vmcore(dump, loads),
            pmem=build_pmem([(b.gpa, b.size) for b in blocks]),
            vmcoreinfo=text,
            _starts=tuple(b.gpa for b in blocks),
        )

    def kcore(self, snap: Snapshot) -> SparseFile | None:
        """The kernel-virtual core of ``snap`` (None when no page-table root
        is known): the guest's kernel page tables as coalesced PT_LOADs
        clipped to RAM."""
        if snap.kcore is not None or snap.kcore_error is not None:
            return snap.kcore
        found = self._page_table_root(snap)
        if isinstance(found, str):
            snap.kcore_error = found
            log.info("no kcore: %s", found)
            return None
        root, levels = found

        def read_phys(gpa: int, length: int) -> bytes:
            buf = bytearray(length)
            self.read_mem(snap, gpa, memoryview(buf))
            return bytes(buf)

        result = walk(read_phys, root, levels=levels, phys_limit=snap.pmem.size, max_runs=KCORE_MAX_RUNS)
        if result.truncated:
            log.warning("kcore: page-table walk stopped at its bounds (%d runs)", len(result.runs))
        runs = clip_runs(result.runs, [(b.gpa, b.size) for b in snap.blocks])
        snap.kcore = build_kcore(snap.dump, runs)
        return snap.kcore

    @staticmethod
    def _page_table_root(snap: Snapshot) -> tuple[int, int] | str:
        """(root, levels) of the kernel page tables, or why there is none:
        VMCOREINFO's ``init_top_pgt``, else the CR3 of a vCPU that was in
        kernel mode (the kernel half is the same in every address space)."""
        if snap.vmcoreinfo_fields is not None:
            try:
                return kernel_root_from_vmcoreinfo(snap.vmcoreinfo_fields)
            except FormatError as e:
                return str(e)
        for cpu in qemu_x86_cpu_states(parse_notes(snap.dump.notes)):
            if cpu.in_kernel and cpu.cr3:
                return cr3_to_root(cpu.cr3), 5 if cpu.cr4 & CR4_LA57 else 4
        return "no VMCOREINFO and no vCPU in kernel mode to take CR3 from"

    def read_mem(self, snap: Snapshot, gpa: int, buf: memoryview) -> None:
        """Fill zeroed ``buf`` with guest memory at ``gpa`` (one block)."""
        src = snap.source_for(gpa)
        read_into(src, gpa - src.block.gpa, buf, self.memory)

    async def status(self) -> str:
        st = await self.monitor.execute("query-status")
        return str(st.get("status", "unknown"))

    async def info(self) -> dict[str, Any]:
        """What ``vmcorefs info`` prints (and ``--json`` emits)."""
        snap = await self.snapshot()
        notes = parse_notes(snap.dump.notes)
        vci = snap.vmcoreinfo_fields
        arch = "unknown"
        try:
            target = await self.monitor.execute("query-target")
            arch = str(target.get("arch", arch))
        except QMPError:
            pass
        return {
            "qmp_socket": self.monitor.path,
            "qemu_pid": self.monitor.pid,
            "qemu_version": self.monitor.version,
            "arch": arch,
            "status": await self.status(),
            "vcpus": count_cpus(notes),
            "memory": [
                {
                    "gpa_start": b.gpa, "gpa_end": b.end, "size": b.size, "name": b.name,
                    "kind": b.kind, "access": s.method, "backing": s.path,
                }
                for b, s in zip(snap.blocks, snap.sources)
            ],
            "vmcore_size": snap.vmcore.size,
            "pmem_size": snap.pmem.size,
            "vmcoreinfo": None if vci is None else {
                "OSRELEASE": vci.get("OSRELEASE"),
                "KERNELOFFSET": vci.get("KERNELOFFSET"),
                "PAGESIZE": vci.get("PAGESIZE"),
            },
            "gdb": None if snap.kernel_offset is None else (
                f"gdb -q -ex 'symbol-file -o {snap.kernel_offset:#x} VMLINUX'"
                " -ex 'core-file MOUNTPOINT/kcore'   (or: gdb -q VMLINUX -x MOUNTPOINT/gdbinit)"),
        }

    def close(self) -> None:
        self.memory.close()
