"""A QEMU guest as vmcorefs sees it: memory map, notes, run state.

:meth:`Guest.snapshot` is the one place where a layout is computed (at each
``open()``): ``info mtree -f`` and ``gpa2hva`` give the guest-physical RAM and
where QEMU maps it, ``/proc/PID/maps`` says how to read it, and the start
of a ``dump-guest-memory`` (``paging=false``) into a pipe passed with
``getfd`` gives QEMU's own notes for this instant (vCPU registers,
VMCOREINFO), its ELF identity and its PT_LOADs -- the blocks it dumps,
which leave out what virtio-mem has not plugged.  The pipe is closed once
the headers and notes are read: QEMU's next write fails and the dump ends
(the guest resumes if it was running).  Reads never need QMP.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Iterator

from vmcorefs.core.elf import DumpInfo, build_pmem, build_vmcore, parse_qemu_dump, qemu_dump_headers_end
from vmcorefs.core.kcore import EM_AARCH64, gdb_program, kernel_view, page_table_root
from vmcorefs.core.layout import Extent, SparseFile
from vmcorefs.core.memmap import (
    FlatRange,
    GuestPhysBlock,
    clip_virtio_mem,
    dumped_blocks,
    guest_phys_blocks,
    parse_gpa2hva,
    parse_mtree_flat,
    parse_virtio_mem,
)
from vmcorefs.core.notes import (
    count_cpus,
    parse_notes,
    parse_vmcoreinfo,
    qemu_x86_cpu_states,
    vmcoreinfo_text,
)
from vmcorefs.core.paging import Run
from vmcorefs.errors import FormatError, GuestMemoryError, QEMUGoneError, QMPError, QMPTimeoutError
from vmcorefs.core.vmcoreinfo import Found, NotFound
from vmcorefs.core.x86_notes import vmcoreinfo_note
from vmcorefs.qemu.memory import ProcessMemory, Source, read_extent
from vmcorefs.qemu.scan import find_vmcoreinfo, revalidate
from vmcorefs.qemu.monitor import Monitor

log = logging.getLogger(__name__)

NOTES_FDNAME = "vmcorefs-notes"
#: Bound on what we read of QEMU's dump (its headers and notes).
MAX_SAMPLE_DUMP = 80 << 20
#: Capacity of the dump's pipe (the minimum, one page): when its headers and
#: notes have been read and the pipe closed, QEMU has read at most this much
#: (plus a page being copied) of the first block's RAM.
DUMP_PIPE_SIZE = 4096
#: Seconds before a VMCOREINFO scan that found nothing is tried again.
RESCAN_AFTER = 10.0


@dataclass
class Snapshot:
    """One consistent layout of a guest: what an open handle serves until it closes.

    Built by :meth:`build` from QEMU's answers (or, in tests, from synthetic
    blocks, notes and memory); holds no connection to QEMU, only the
    descriptors of ``sources`` (owned by the guest's
    :class:`~vmcorefs.qemu.memory.ProcessMemory`) and ``alive``, which tells
    whether QEMU still runs when a read fails.
    """

    #: ``time.monotonic()`` seconds when the layout was computed.
    taken: float
    #: What QEMU's dump writes, sorted by ``gpa``; ``sources[i]`` reads ``blocks[i]``.
    blocks: tuple[GuestPhysBlock, ...]
    sources: tuple[Source, ...]
    #: QEMU's ELF identity and PT_NOTE bytes for this instant.
    dump: DumpInfo
    vmcore: SparseFile
    pmem: SparseFile
    #: The guest's VMCOREINFO text, None when it published none.
    vmcoreinfo: str | None
    alive: Callable[[], bool] = field(repr=False, compare=False)
    _starts: tuple[int, ...] = field(repr=False, compare=False)
    #: Where VMCOREINFO came from: ``device`` (QEMU's notes), ``guest RAM at
    #: GPA 0x...`` (found by vmcorefs), or ``none (why)``.
    vmcoreinfo_origin: str = "device"
    #: The QEMU process whose memory the ``PROCMEM`` sources read (None: unknown).
    pid: int | None = None

    @classmethod
    def build(cls, blocks: list[GuestPhysBlock], sources: list[Source], dump: DumpInfo,
              alive: Callable[[], bool], taken: float | None = None,
              vmcoreinfo_origin: str | None = None, pid: int | None = None) -> "Snapshot":
        """The layouts of ``vmcore`` and ``pmem`` for ``blocks`` read through
        ``sources``, with ``dump``'s notes (VMCOREINFO taken from them)."""
        text = vmcoreinfo_text(parse_notes(dump.notes))
        if vmcoreinfo_origin is None:
            vmcoreinfo_origin = "device" if text is not None else "none"
        loads = [Run(b.gpa if dump.vaddr_is_paddr else 0, b.gpa, b.size) for b in blocks]
        return cls(
            taken=time.monotonic() if taken is None else taken,
            blocks=tuple(blocks),
            sources=tuple(sources),
            dump=dump,
            vmcore=build_vmcore(dump, loads),
            pmem=build_pmem([(b.gpa, b.size) for b in blocks]),
            vmcoreinfo=text,
            alive=alive,
            _starts=tuple(b.gpa for b in blocks),
            vmcoreinfo_origin=vmcoreinfo_origin,
            pid=pid,
        )

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

    @cached_property
    def _kcore(self) -> SparseFile | FormatError:
        try:
            root = page_table_root(self.vmcoreinfo_fields, self.dump)
        except FormatError as e:
            log.info("no kcore: %s", e)
            return e
        view = kernel_view(self.read_phys, self.dump, root, [(b.gpa, b.size) for b in self.blocks])
        if view.truncated:
            log.warning("kcore: page-table walk stopped at its bounds (%d PT_LOADs)",
                        len(view.file.segments))
        return view.file

    def kcore(self) -> SparseFile:
        """The kernel-virtual core (one page-table walk, on first use, then kept).

        Raises :class:`FormatError` when no page-table root is known (no
        VMCOREINFO, no vCPU in kernel mode) or VMCOREINFO is malformed.
        """
        result = self._kcore
        if isinstance(result, FormatError):
            raise result
        return result

    def _source_index(self, gpa: int) -> int:
        i = bisect.bisect_right(self._starts, gpa) - 1
        return i if i >= 0 and gpa < self.blocks[i].end else -1

    def source_for(self, gpa: int) -> Source:
        """The source of the block holding ``gpa``; :class:`GuestMemoryError` if none."""
        i = self._source_index(gpa)
        if i < 0:
            raise GuestMemoryError("no RAM block", gpa)
        return self.sources[i]

    def resolve_range(self, gpa: int, length: int) -> Iterator[Extent]:
        """Extents reading ``length`` bytes of guest-physical ``gpa``, with
        offsets relative to ``gpa``: split where a block ends, ranges outside
        every block left out (they read as zeros)."""
        pos = 0
        while pos < length:
            i = self._source_index(gpa + pos)
            if i < 0:
                nxt = bisect.bisect_right(self._starts, gpa + pos)
                step = min(length - pos, self._starts[nxt] - (gpa + pos)) if nxt < len(self._starts) else length - pos
            else:
                src = self.sources[i]
                step = min(length - pos, src.block.end - (gpa + pos))
                yield src.extent(pos, gpa + pos, step)
            pos += step

    def resolve(self, file: SparseFile) -> SparseFile:
        """``file`` with its guest-physical segments resolved to ``SHARED`` /
        ``PROCMEM`` extents of this snapshot's sources (what reads use)."""
        return file.resolve(self.resolve_range)

    def read_phys(self, gpa: int, length: int) -> bytes:
        """``length`` bytes of guest-physical memory at ``gpa`` (zeros outside RAM).

        Raises :class:`~vmcorefs.errors.QEMUGoneError` when QEMU has exited.
        """
        buf = bytearray(length)
        view = memoryview(buf)
        for ext in self.resolve_range(gpa, length):
            read_extent(ext, view[ext.offset:ext.offset + ext.length], self.alive)
        return bytes(buf)


async def _read_dump_start(r: int, command: asyncio.Future[Any]) -> bytes | None:
    """The first bytes of the dump QEMU writes into the pipe whose
    (non-blocking) read end is ``r``, up to the end of its notes; None when
    ``command`` (the dump) ended first without writing that much.  Raises
    :class:`FormatError` for malformed headers, or more than
    ``MAX_SAMPLE_DUMP`` bytes of them."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    have: asyncio.Future[bool] = loop.create_future()

    def readable() -> None:
        while not have.done():
            try:
                chunk = os.read(r, 1 << 16)
            except BlockingIOError:
                return
            buf.extend(chunk)
            try:
                end = qemu_dump_headers_end(bytes(buf))
            except FormatError as e:
                have.set_exception(e)
                return
            if end is not None and len(buf) >= end:
                have.set_result(True)
            elif not chunk:
                have.set_result(False)  # QEMU closed the pipe: the dump ended
            elif len(buf) > MAX_SAMPLE_DUMP:
                have.set_exception(FormatError(f"QEMU's dump headers and notes exceed {MAX_SAMPLE_DUMP} bytes"))

    loop.add_reader(r, readable)
    try:
        await asyncio.wait({have, command}, return_when=asyncio.FIRST_COMPLETED)
        if not have.done():
            readable()  # the dump ended first: what did it write?
    finally:
        loop.remove_reader(r)
    if not have.done():
        have.cancel()
        return None
    end = qemu_dump_headers_end(bytes(buf)) if have.result() else None
    return None if end is None else bytes(buf[:end])


class Guest:
    """The running QEMU behind a QMP monitor."""

    #: Whether :meth:`dump_info`'s notes are QEMU's own, which carry
    #: ``-device vmcoreinfo``'s copy once the guest registered (so a device
    #: without it means the guest never did).
    device_notes: bool = True

    def __init__(self, monitor: Monitor, memory_mode: str = "auto") -> None:
        """``memory_mode``: ``auto``, ``shared`` or ``procmem`` (``--memory``);
        raises :class:`~vmcorefs.errors.UsageError` for another value."""
        self._found: Found | NotFound | None = None
        self._found_at = 0.0
        self.monitor = monitor
        self.memory = ProcessMemory(monitor.pid, memory_mode)
        self._dump_lock = asyncio.Lock()

    async def flat_ranges(self) -> list[FlatRange]:
        """The FlatView of the guest-physical address space (HMP ``info mtree -f``).

        Raises :class:`QMPError` and its kin, :class:`FormatError`."""
        text = await self.monitor.hmp("info mtree -f")
        return parse_mtree_flat(text)

    async def ram_blocks(self) -> list[GuestPhysBlock]:
        """The guest-physical blocks of RAM as ``dump-guest-memory
        paging=false`` joins them, sorted by ``gpa``: one ``info mtree -f``
        and one ``gpa2hva`` per dumped range.  A virtio-mem region is
        whole here; :meth:`snapshot` keeps only what the dump holds.
        Raises :class:`QMPError` and its kin, :class:`FormatError`."""
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

    async def dump_info(self, blocks: list[GuestPhysBlock]) -> DumpInfo:
        """QEMU's ELF identity, notes and PT_LOADs, from the start of its dump.

        One ``getfd`` (a pipe's write end passed over the socket) and one
        ``dump-guest-memory`` (``paging=false``) whose ELF header, program
        headers and notes (a few KiB per vCPU) are read as QEMU writes them;
        then the pipe is closed and QEMU's dump fails on its next write
        (``Broken pipe``), having read at most ``DUMP_PIPE_SIZE`` bytes of
        guest RAM (about 2 ms in all).  QEMU stops a running guest for the
        dump and resumes it after.  ``blocks`` (from :meth:`ram_blocks`)
        must not be empty.  Raises :class:`QMPError` (no RAM, the dump
        failed before its notes), :class:`~vmcorefs.errors.QEMUGoneError`,
        :class:`FormatError` for malformed or oversized headers.
        """
        if not blocks:
            raise QMPError("the guest has no RAM to dump", "dump-guest-memory")
        async with self._dump_lock:
            r, w = os.pipe2(os.O_CLOEXEC)
            data: bytes | None = None
            try:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, DUMP_PIPE_SIZE)
                os.set_blocking(r, False)
                try:
                    self.monitor.send_fd(w)
                    await self.monitor.execute("getfd", {"fdname": NOTES_FDNAME})
                finally:
                    os.close(w)
                command = asyncio.ensure_future(self.monitor.execute(
                    "dump-guest-memory", {"paging": False, "protocol": f"fd:{NOTES_FDNAME}"}))
                try:
                    data = await _read_dump_start(r, command)
                finally:
                    os.close(r)  # QEMU's next write fails: the dump ends
                    r = -1
                    # Its answer (an error when we stopped it) comes once QEMU
                    # has resumed the guest; the next dump would be refused before.
                    await asyncio.wait({command})
            finally:
                if r >= 0:
                    os.close(r)
            if data is None:
                command.result()  # QEMU's own error (a dump in progress, a migration, ...)
                raise QMPError("QEMU's dump ended before its notes", "dump-guest-memory")
            failure = command.exception()
            if isinstance(failure, (QEMUGoneError, QMPTimeoutError)):
                raise failure
        return parse_qemu_dump(data)

    async def snapshot(self) -> Snapshot:
        """The current layout of ``vmcore``, ``pmem`` and ``kcore``.

        Costs one ``info mtree -f``, one HMP ``gpa2hva`` per dumped range, a
        read of ``/proc/PID/maps``, and the headers and notes of one
        ``dump-guest-memory`` (a few ms in all; :meth:`dump_info`).  Raises :class:`QMPError` (and its
        subclasses: :class:`~vmcorefs.errors.QMPTimeoutError`,
        :class:`~vmcorefs.errors.QEMUGoneError`), :class:`FormatError` for
        output it cannot parse, :class:`~vmcorefs.errors.AccessError` when
        guest memory cannot be reached.
        """
        for attempt in range(2):
            blocks = await self.ram_blocks()
            dump = await self.dump_info(blocks)
            try:
                blocks = await self._populated(blocks, dump)
                break
            except FormatError:
                if attempt:
                    raise  # the map moved under both tries
        sources = self.memory.sources(blocks)
        origin = None
        if vmcoreinfo_text(parse_notes(dump.notes)) is None:
            dump, origin = await asyncio.get_running_loop().run_in_executor(
                None, self._vmcoreinfo_from_ram, dump, sources)
        return Snapshot.build(blocks, sources, dump, self.memory.alive, vmcoreinfo_origin=origin,
                              pid=self.memory.pid)

    async def _populated(self, blocks: list[GuestPhysBlock], dump: DumpInfo) -> list[GuestPhysBlock]:
        """``blocks`` (``info mtree -f``) reduced to what QEMU's dump holds:
        its PT_LOADs when ``dump`` came from QEMU; else (notes built without
        a dump: libvirt) without the virtio-mem devices that have nothing
        plugged, per ``query-memory-devices`` (:func:`clip_virtio_mem`; a
        partly plugged device stays whole).  Raises :class:`FormatError`
        when a PT_LOAD lies outside ``blocks``."""
        if dump.loads:
            return dumped_blocks(blocks, dump.loads)
        try:
            devices = parse_virtio_mem(await self.monitor.execute("query-memory-devices"))
        except (QMPError, FormatError) as e:
            log.info("query-memory-devices: %s", e)
            return blocks
        kept, partial = clip_virtio_mem(blocks, devices)
        for d in partial:
            log.info("virtio-mem %s: %d of %d bytes plugged, which blocks is not known without a dump;"
                     " its whole region is listed", d.id, d.size, d.max_size)
        return kept

    def _vmcoreinfo_from_ram(self, dump: DumpInfo, sources: list[Source]) -> tuple[DumpInfo, str]:
        """``dump`` with the guest's VMCOREINFO note appended (as QEMU's
        device would have put it: the last note), found in guest RAM, and
        where it came from.  The result is kept for the guest's boot: each
        call re-validates it (a few pages), a reset or kexec rescans; a scan
        that found nothing is retried at most every ``RESCAN_AFTER`` seconds.
        x86 only: a copy is checked against the page tables of a vCPU's CR3,
        and QEMU's notes of other guests (aarch64: no TTBR1_EL1) name none."""
        if dump.e_machine == EM_AARCH64:
            return dump, ("none (the VMCOREINFO search in guest RAM is x86-only: QEMU's aarch64 notes"
                          " carry no TTBR1_EL1 to check a copy against; add -device vmcoreinfo)")
        cpus = qemu_x86_cpu_states(parse_notes(dump.notes))
        now = time.monotonic()
        result: Found | NotFound | None = None
        if isinstance(self._found, Found):
            result = revalidate(self._found, self.memory, sources, cpus)
            if isinstance(result, NotFound):
                log.info("VMCOREINFO: %s; scanning again", result.reason)
                result = None
        elif isinstance(self._found, NotFound) and now - self._found_at < RESCAN_AFTER:
            result = self._found
        if result is None:
            result = find_vmcoreinfo(self.memory, sources, cpus)
            self._found_at = now
            log.info("VMCOREINFO scan: %s", result.stats)
        self._found = result
        if isinstance(result, NotFound):
            return dump, f"none ({result.reason})"
        notes = dump.notes + vmcoreinfo_note(result.text.encode())
        return replace(dump, notes=notes), f"guest RAM at GPA {result.gpa:#x}"

    async def status(self) -> str:
        """QMP ``query-status``'s ``status``: ``running``, ``paused``, ... Raises :class:`QMPError`."""
        st = await self.monitor.execute("query-status")
        return str(st.get("status", "unknown"))

    async def pause(self) -> None:
        """QMP ``stop``.  Raises :class:`QMPError`."""
        await self.monitor.execute("stop")

    async def resume(self) -> None:
        """QMP ``cont``.  Raises :class:`QMPError`."""
        await self.monitor.execute("cont")

    @property
    def pid(self) -> int | None:
        """PID of the QEMU process (None when not visible)."""
        return self.monitor.pid

    def alive(self) -> bool:
        """False once the QEMU process has exited."""
        return self.memory.alive()

    async def info(self) -> dict[str, Any]:
        """What ``vmcorefs info`` prints (and ``--json`` emits): one snapshot
        plus ``query-target``, ``query-status`` (and two ``qom-list`` when
        VMCOREINFO did not come from the device).  Raises as :meth:`snapshot`."""
        snap = await self.snapshot()
        notes = parse_notes(snap.dump.notes)
        gdb = gdb_program(snap.dump.e_machine)
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
            "vmcoreinfo_origin": await self._origin_hint(snap),
            "gdb": None if snap.kernel_offset is None else (
                f"{gdb} -q -ex 'symbol-file -o {snap.kernel_offset:#x} VMLINUX'"
                f" -ex 'core-file MOUNTPOINT/kcore'   (or: {gdb} -q VMLINUX -x MOUNTPOINT/gdbinit)"),
        }

    async def _has_vmcoreinfo_device(self) -> bool:
        """Whether QEMU has a ``vmcoreinfo`` device: one of the children of
        ``/machine/peripheral`` (``-device ...,id=``) or
        ``/machine/peripheral-anon`` (no id) in QOM (QMP ``qom-list``; ``info
        qtree`` shows devices on buses only, and this one has none)."""
        for container in ("/machine/peripheral", "/machine/peripheral-anon"):
            try:
                children = await self.monitor.execute("qom-list", {"path": container})
            except QMPError:
                continue
            if any(isinstance(c, dict) and c.get("type") == "child<vmcoreinfo>" for c in children or ()):
                return True
        return False

    async def _origin_hint(self, snap: Snapshot) -> str:
        """Where VMCOREINFO came from, with a hint when it did not come from
        the device: the device is there but the guest never registered
        (whether or not a copy was found in guest RAM), or why there is none."""
        origin = snap.vmcoreinfo_origin
        if origin == "device":
            return origin
        if self.device_notes and await self._has_vmcoreinfo_device():
            return (f"{origin}; -device vmcoreinfo is present but the guest never registered"
                    " (load its qemu_fw_cfg driver)")
        if snap.vmcoreinfo is not None:
            return origin
        if await self.status() in ("prelaunch", "inmigrate") or (
                snap.dump.e_machine != EM_AARCH64 and not qemu_x86_cpu_states(parse_notes(snap.dump.notes))):
            return f"{origin}; the guest has not booted yet"
        return origin

    def close(self) -> None:
        """Close the descriptors of guest memory (not the monitor)."""
        self.memory.close()
