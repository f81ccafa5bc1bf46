"""Finding the guest's VMCOREINFO in the RAM of a running QEMU.

When QEMU's notes carry no ``VMCOREINFO`` (no ``-device vmcoreinfo``, or
the guest never registered its note), :func:`find_vmcoreinfo` reads guest
RAM for the copies Linux keeps there and returns the one that matches the
running kernel (:mod:`vmcorefs.core.vmcoreinfo` says what is looked for,
how a copy is validated and which one wins).  :func:`revalidate` checks a
previous result again at the cost of a few pages, for every ``open()``.

Only memory the host has populated is read, and never by faulting it in:

* shared backends (memfd, file): ``lseek(SEEK_DATA/SEEK_HOLE)`` on the
  backing file lists the ranges that hold data; holes are skipped;
* private RAM: ``/proc/PID/pagemap`` says which of QEMU's pages are present
  (or swapped out); pages never touched, or mapped to the kernel's zero
  page (or huge zero page), are skipped.  Its ``PAGEMAP_SCAN`` ioctl (Linux
  6.7+) lists those runs in a few calls; older kernels' entries are read,
  8 bytes per page (512 MiB for a 256 GiB guest).  The rest is read with ``pread``
  of ``/proc/PID/mem``, which maps nothing new into QEMU.  Without access to
  the pagemap (it needs the same ptrace access as ``/proc/PID/mem``)
  private RAM is not scanned: reading it blind would map the zero page into
  QEMU for every page it never touched.

Guest RAM is never mmapped.  Reads go in chunks of at most
:attr:`ScanLimits.chunk` bytes of populated memory, in guest-physical
order.  Pages the host swapped out are read in a second pass, only when the
resident ones held no valid copy (reading them swaps them in).

Bounds (:class:`ScanLimits`): the scan stops after ``max_bytes`` bytes read
or ``max_seconds`` seconds, and, by default, as soon as it has validated
Linux's pair (a note and a text copy with the same text); ``Found.stats`` /
``NotFound.stats`` say what it cost and whether it ran to the end.  Linux
allocates both copies early at boot, so the pair is usually in the first
tens of MiB of RAM.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from vmcorefs.core.layout import PAGE_SIZE
from vmcorefs.core.vmcoreinfo import (
    COPY_SPAN,
    CPUState,
    Finder,
    Found,
    NotFound,
    Rejected,
    ScanStats,
    kernel_roots,
    parse_copy,
    translator,
    validate,
)
from vmcorefs.errors import GuestMemoryError, QEMUGoneError
from vmcorefs.qemu.memory import ProcessMemory, Source, read_extent

#: Pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_MMAP_EXCLUSIVE = 1 << 56
PM_PFN_MASK = (1 << 55) - 1
HUGE = 2 << 20
#: Pagemap entries read per system call (covers 32 MiB of QEMU's memory).
PAGEMAP_BATCH = 8192

#: ``PAGEMAP_SCAN`` ioctl of ``/proc/PID/pagemap`` (Linux 6.7;
#: ``_IOWR('f', 16, struct pm_scan_arg)``, <linux/fs.h>) and its page categories.
PAGEMAP_SCAN = 0xC0606610
PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_PFNZERO, PAGE_IS_HUGE = 1 << 3, 1 << 4, 1 << 5, 1 << 6
#: Regions one ``PAGEMAP_SCAN`` call returns at most.
SCAN_REGIONS = 4096


class page_region(ctypes.Structure):
    """<linux/fs.h> ``struct page_region``: ``[start, end)`` addresses, categories."""

    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class pm_scan_arg(ctypes.Structure):
    """<linux/fs.h> ``struct pm_scan_arg`` (``walk_end``: where the kernel stopped)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


#: Page kinds in :meth:`GuestRAM.populated` runs.
RESIDENT, SWAPPED = "resident", "swapped"
#: Runs of resident (1) or swapped (2) pages in a :meth:`GuestRAM._kinds` map.
_RUNS = re.compile(rb"\x01+|\x02+")
#: Pagemap entry's top byte (bits 56..63) -> 1 present, 2 swapped, 0 neither.
_KIND_OF_TOP_BYTE = bytes(1 if b & 0x80 else 2 if b & 0x40 else 0 for b in range(256))


@dataclass(frozen=True)
class ScanLimits:
    """Bounds on one scan.

    ``max_bytes``: populated guest memory read (bytes); ``max_seconds``:
    wall-clock time; ``chunk``: bytes per read (a multiple of 4096);
    ``stop_at_pair``: stop once Linux's note/text pair has validated;
    ``read_swapped``: read swapped-out pages when resident ones held no
    valid copy.
    """

    max_bytes: int = 64 << 30
    max_seconds: float = 60.0
    chunk: int = 1 << 20
    stop_at_pair: bool = True
    read_swapped: bool = True


def _own_zero_pfn(size: int, huge: bool) -> int:
    """The PFN a read fault maps at an untouched private anonymous address
    of ours (the kernel's zero page, or huge zero page); 0 when unknown
    (PFNs hidden without CAP_SYS_ADMIN, THP or its zero page off)."""
    m = mmap.mmap(-1, 2 * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        off = -addr % size
        if huge:
            try:
                m.madvise(mmap.MADV_HUGEPAGE, off, size)
            except OSError:
                return 0
        _ = m[off]  # read fault: maps the (huge) zero page, writes nothing
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), 8, (addr + off) // PAGE_SIZE * 8)
        ent = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        pfn = ent & PM_PFN_MASK
        # A page of our own (THP without its zero page) would be exclusively
        # mapped, and reused by others once freed: never take it for a zero page.
        if not ent & PM_PRESENT or ent & PM_MMAP_EXCLUSIVE or pfn % (size // PAGE_SIZE):
            return 0
        return pfn
    except OSError:
        return 0
    finally:
        m.close()


@functools.cache
def zero_pfns() -> tuple[int, int]:
    """``(zero page PFN, huge zero page PFN)`` of this host, 0 when unknown."""
    small = _own_zero_pfn(PAGE_SIZE, False)
    huge = _own_zero_pfn(HUGE, True)
    return small, (huge if huge != small else 0)


def _zero_page_entries(raw: bytes, small: int, huge: int) -> Iterator[int]:
    """Indexes of the present entries of pagemap bytes ``raw`` that map the
    zero page ``small`` or the huge zero page ``huge`` (PFNs; 0 unknown).

    Found at C speed: the low 6 bytes of an entry are PFN bits 0..47, so
    the zero page and the head of the huge zero page are byte patterns; the
    entries after a head that continue it are the rest of the huge page.
    An entry missed (a huge zero page whose head is before ``raw``) only
    costs a read of zeros QEMU already maps.
    """
    ents = memoryview(raw).cast("Q")
    for pfn, span in ((small, 1), (huge, HUGE // PAGE_SIZE)):
        if not 0 < pfn < 1 << 48:
            continue
        needle = pfn.to_bytes(6, "little")
        pos = raw.find(needle)
        while pos >= 0:
            if pos % 8:
                pos = raw.find(needle, pos + 1)
                continue
            i = j = pos // 8
            while j < min(i + span, len(ents)) and ents[j] & PM_PRESENT and ents[j] & PM_PFN_MASK == pfn + j - i:
                yield j
                j += 1
            pos = raw.find(needle, 8 * max(j, i + 1))


class GuestRAM:
    """Read-only access to guest-physical memory that skips what the host
    never populated.  ``sources`` come from :meth:`ProcessMemory.sources`
    (sorted by guest-physical address, as the snapshot's blocks are)."""

    def __init__(self, memory: ProcessMemory, sources: Sequence[Source]) -> None:
        self.memory = memory
        self.sources = sorted(sources, key=lambda s: s.block.gpa)
        self._starts = [s.block.gpa for s in self.sources]
        self.phys_limit = max((s.block.end for s in self.sources), default=0)
        self._pagemap: int | None = None
        self._pagemap_tried = False
        self._zero = zero_pfns()
        #: False once PAGEMAP_SCAN failed as unknown: entries are read instead.
        self._scan_ok = True
        #: True when private RAM was skipped: its pagemap could not be read.
        self.blind = False

    def close(self) -> None:
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None

    def __enter__(self) -> GuestRAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pagemap_fd(self) -> int | None:
        if not self._pagemap_tried:
            self._pagemap_tried = True
            try:
                self._pagemap = os.open(f"/proc/{self.memory.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._pagemap = None
        return self._pagemap

    def _scan_regions(self, hva: int, size: int) -> list[tuple[int, int, str]] | None:
        """``(start, end, kind)`` runs of QEMU's ``[hva, hva + size)`` that
        hold data, by ``PAGEMAP_SCAN``: present or swapped, not the zero page,
        and not the huge zero page (a THP run's head PFNs, one pagemap entry
        per 2 MiB).  One call covers many GiB where :meth:`_kinds` reads 8
        bytes per page.  None when the kernel has no ``PAGEMAP_SCAN`` (before
        6.7) or the pagemap cannot be opened: the caller reads entries."""
        fd = self._pagemap_fd()
        if fd is None or not self._scan_ok:
            return None
        vec = (page_region * SCAN_REGIONS)()
        arg = pm_scan_arg(size=ctypes.sizeof(pm_scan_arg), vec=ctypes.addressof(vec), vec_len=SCAN_REGIONS,
                          category_inverted=PAGE_IS_PFNZERO, category_mask=PAGE_IS_PFNZERO,
                          category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                          return_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_HUGE)
        out: list[tuple[int, int, str]] = []
        start, end = hva, hva + size
        while start < end:
            arg.start, arg.end, arg.walk_end = start, end, 0
            try:
                n = fcntl.ioctl(fd, PAGEMAP_SCAN, arg, True)
            except OSError as e:
                if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP) and not out and start == hva:
                    self._scan_ok = False
                return None
            # Linux 6.18 was seen returning every region of a 64 GiB range
            # with walk_end at its middle: go on after what was reported.
            walked = max(arg.walk_end, vec[n - 1].end if n else 0)
            for r in vec[:n]:
                if r.start < start:
                    return None  # not the kernel's documented behaviour: read entries instead
                kind = SWAPPED if r.categories & PAGE_IS_SWAPPED else RESIDENT
                if r.categories & PAGE_IS_HUGE and kind == RESIDENT:
                    out.extend(self._without_huge_zero(fd, r.start, r.end))
                elif out and out[-1][1] == r.start and out[-1][2] == kind:
                    out[-1] = (out[-1][0], r.end, kind)
                else:
                    out.append((r.start, r.end, kind))
            if walked <= start:
                return None  # no progress: the kernel would loop
            start = walked
        return out

    def _without_huge_zero(self, fd: int, start: int, end: int) -> Iterator[tuple[int, int, str]]:
        """``[start, end)`` (THP-mapped, resident) without the 2 MiB pages
        mapping the huge zero page (``PAGE_IS_PFNZERO`` is for the small one)."""
        huge = self._zero[1]
        if not huge:
            yield start, end, RESIDENT
            return
        run = start
        for head in range(start - start % HUGE, end, HUGE):
            try:
                raw = os.pread(fd, 8, head // PAGE_SIZE * 8) if head >= start else b""
            except OSError:
                raw = b""  # kept: at worst zeros are read
            ent = int.from_bytes(raw, "little") if len(raw) == 8 else 0
            if ent & PM_PRESENT and ent & PM_PFN_MASK == huge:
                if head > run:
                    yield run, head, RESIDENT
                run = head + HUGE
        if end > run:
            yield run, end, RESIDENT

    def _kinds(self, hva: int, npages: int) -> bytes | None:
        """One byte per page of QEMU's ``[hva, hva + npages * 4096)``:
        0 no data, 1 resident, 2 swapped; None when the pagemap cannot be
        read."""
        fd = self._pagemap_fd()
        if fd is None:
            return None
        small, huge = self._zero
        out = bytearray()
        first = hva // PAGE_SIZE
        while len(out) < npages:
            n = min(PAGEMAP_BATCH, npages - len(out))
            try:
                raw = os.pread(fd, 8 * n, 8 * (first + len(out)))
            except OSError:
                return None
            if len(raw) != 8 * n:
                return None
            # The top byte of each entry holds PM_PRESENT and PM_SWAPPED.
            kinds = bytearray(raw[7::8].translate(_KIND_OF_TOP_BYTE))
            for i in _zero_page_entries(raw, small, huge):
                kinds[i] = 0  # present, but mapping a zero page: no data
            out += kinds
        return bytes(out)

    def populated(self, src: Source) -> Iterator[tuple[int, int, str]]:
        """``(offset in block, length, kind)`` runs of ``src``'s block that
        hold data, in order; ``kind`` is :data:`RESIDENT` or :data:`SWAPPED`.
        Private RAM whose pagemap cannot be read yields nothing (and sets
        :attr:`blind`).  Runs end at least every 32 MiB."""
        size = src.block.size
        if src.method == "shared":
            yield from self._file_data(src)
            return
        regions = self._scan_regions(src.base, size)
        if regions is not None:
            for start, end, kind in regions:
                for off in range(start, end, PAGEMAP_BATCH * PAGE_SIZE):
                    yield off - src.base, min(end - off, PAGEMAP_BATCH * PAGE_SIZE), kind
            return
        for first in range(0, size // PAGE_SIZE, PAGEMAP_BATCH):
            kinds = self._kinds(src.base + first * PAGE_SIZE, min(PAGEMAP_BATCH, size // PAGE_SIZE - first))
            if kinds is None:
                if not self.memory.alive():
                    raise QEMUGoneError("QEMU has exited")
                self.blind = True  # reading blind would fault in every untouched page: skip the block
                return
            for m in _RUNS.finditer(kinds):
                kind = RESIDENT if kinds[m.start()] == 1 else SWAPPED
                yield (first + m.start()) * PAGE_SIZE, (m.end() - m.start()) * PAGE_SIZE, kind

    def _file_data(self, src: Source) -> Iterator[tuple[int, int, str]]:
        """Data ranges of a shared backing file, by SEEK_DATA/SEEK_HOLE on a
        descriptor of our own (the shared one's file offset is left alone)."""
        try:
            fd = os.open(f"/proc/self/fd/{src.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            yield 0, src.block.size, RESIDENT
            return
        try:
            start, end = src.base, src.base + src.block.size
            off = start
            while off < end:
                try:
                    data = os.lseek(fd, off, os.SEEK_DATA)
                    hole = os.lseek(fd, data, os.SEEK_HOLE)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data after off
                        return
                    yield off - start, end - off, RESIDENT  # no SEEK_DATA: read it all
                    return
                data -= (data - start) % PAGE_SIZE
                hole = min(end, hole + (-(hole - start) % PAGE_SIZE))
                if data >= end:
                    return
                yield data - start, hole - data, RESIDENT
                off = hole
        finally:
            os.close(fd)

    def read(self, src: Source, delta: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``delta`` bytes into ``src``'s block (unreadable
        pages become zeros; QEMUGoneError when QEMU exits)."""
        gpa = src.block.gpa + delta
        read_extent(src.extent(0, gpa, len(buf)), buf, self.memory.alive)

    def source_for(self, gpa: int) -> Source | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self.sources[i].block.end:
            return self.sources[i]
        return None

    def read_phys(self, gpa: int, length: int) -> bytes:
        """``length`` bytes of guest memory from ``gpa`` (a
        :data:`~vmcorefs.core.paging.ReadPhys`): pages that hold no data
        read as zeros without being read; the read stops at the end of the
        block (short).  Raises GuestMemoryError when ``gpa`` is not RAM."""
        src = self.source_for(gpa)
        if src is None:
            raise GuestMemoryError("no RAM block", gpa)
        delta = gpa - src.block.gpa
        length = max(0, min(length, src.block.size - delta))
        buf = bytearray(length)
        view = memoryview(buf)
        if src.method == "shared":
            self.read(src, delta, view)
            return bytes(buf)
        first = (src.base + delta) // PAGE_SIZE
        npages = (src.base + delta + length + PAGE_SIZE - 1) // PAGE_SIZE - first
        kinds = self._kinds(first * PAGE_SIZE, npages)
        if kinds is None:
            self.read(src, delta, view)
            return bytes(buf)
        for i, k in enumerate(kinds):
            if not k:
                continue
            lo = max(0, (first + i) * PAGE_SIZE - (src.base + delta))
            hi = min(length, (first + i + 1) * PAGE_SIZE - (src.base + delta))
            self.read(src, delta + lo, view[lo:hi])
        return bytes(buf)


class _Scan:
    """One scan: feeds populated memory to a :class:`Finder` within bounds."""

    def __init__(self, ram: GuestRAM, finder: Finder, limits: ScanLimits) -> None:
        self.ram = ram
        self.finder = finder
        self.limits = limits
        self.bytes_read = self.bytes_skipped = self.swapped_read = 0
        self.started = time.monotonic()
        self.stopped = ""

    def bound(self) -> str:
        if self.bytes_read >= self.limits.max_bytes:
            return f"read {self.bytes_read} bytes (max_bytes)"
        if time.monotonic() - self.started >= self.limits.max_seconds:
            return f"ran {self.limits.max_seconds:g} s (max_seconds)"
        if self.limits.stop_at_pair and self.finder.paired:
            return "validated Linux's note and text pair"
        return ""

    def run(self, kind: str) -> None:
        """Feed every populated run of ``kind``; stops at a bound.  The
        resident pass also counts the bytes holding no data it passes."""
        buf = bytearray(self.limits.chunk)
        for src in self.ram.sources:
            covered = 0
            for delta, length, k in self.ram.populated(src):
                if kind == RESIDENT:
                    self.bytes_skipped += delta - covered
                    covered = delta + length
                if k != kind:
                    continue
                for pos in range(delta, delta + length, self.limits.chunk):
                    if why := self.bound():
                        self.stopped = why
                        return
                    n = min(self.limits.chunk, delta + length - pos)
                    self.ram.read(src, pos, memoryview(buf)[:n])
                    self.bytes_read += n
                    if kind == SWAPPED:
                        self.swapped_read += n
                    self.finder.feed(buf if n == len(buf) else buf[:n], src.block.gpa + pos)
            if kind == RESIDENT:
                self.bytes_skipped += src.block.size - covered

    def stats(self) -> ScanStats:
        return ScanStats(self.bytes_read, self.bytes_skipped, self.swapped_read, self.finder.hits,
                         time.monotonic() - self.started, not self.stopped, self.stopped)


def find_vmcoreinfo(memory: ProcessMemory, sources: Sequence[Source], cpus: Sequence[CPUState],
                    limits: ScanLimits = ScanLimits()) -> Found | NotFound:
    """The running kernel's VMCOREINFO, from guest RAM.

    ``memory``/``sources``: how to read each RAM block (the snapshot's
    ``ProcessMemory`` and ``sources``); ``cpus``: the vCPUs' CR3/CR4 (e.g.
    ``qemu_x86_cpu_states(parse_notes(dump.notes))``), whose page tables are
    the truth copies are checked against.  Returns :class:`Found` (text,
    where, the others and why copies were rejected) or :class:`NotFound`
    (one line for users); both carry :class:`ScanStats`.  Raises
    QEMUGoneError when QEMU exits under the scan.  Cost: see the module
    docstring; pause the guest for a result of one instant.
    """
    roots = kernel_roots(cpus)
    if not roots:
        return NotFound("no vCPU has paging enabled (CR3 is 0): nothing to check a VMCOREINFO copy against")
    with GuestRAM(memory, sources) as ram:
        finder = Finder(ram.read_phys, translator(ram.read_phys, roots, ram.phys_limit), ram.phys_limit)
        scan = _Scan(ram, finder, limits)
        scan.run(RESIDENT)
        if not finder.valid and not scan.stopped and limits.read_swapped:
            scan.run(SWAPPED)
        stats = scan.stats()
        blind = (f" (private RAM skipped: /proc/{memory.pid}/pagemap cannot be read, and reading blind"
                 " would fault in every page QEMU never touched)") if ram.blind else ""
        read = f"{stats.bytes_read >> 20} MiB" if stats.bytes_read >= 1 << 20 else f"{stats.bytes_read >> 10} KiB"
        return finder.result(stats, f"{read} of populated guest RAM{blind}")


def revalidate(found: Found, memory: ProcessMemory, sources: Sequence[Source],
               cpus: Sequence[CPUState]) -> Found | NotFound:
    """Check a previous :func:`find_vmcoreinfo` result against the guest as
    it is now: the copy at ``found.gpa`` still holds the same text and
    still validates against the vCPUs' live page tables.  Returns ``found``
    (with fresh stats) or NotFound saying what changed -- after a reset,
    reboot or kexec into another kernel, scan again.  Cost: about three
    pages of the copy plus a few page-table pages (a millisecond or two).
    """
    started = time.monotonic()
    roots = kernel_roots(cpus)
    if not roots:
        return NotFound("no vCPU has paging enabled (CR3 is 0): the guest is booting")
    with GuestRAM(memory, sources) as ram:
        try:
            c = parse_copy(ram.read_phys(found.gpa, COPY_SPAN), found.gpa, found.form)
        except GuestMemoryError as e:
            return NotFound(f"VMCOREINFO copy at {found.gpa:#x} is gone: {e}")
        if isinstance(c, Rejected):
            return NotFound(f"VMCOREINFO copy at {found.gpa:#x} changed: {c.reason}")
        if c.text != found.text:
            return NotFound(f"VMCOREINFO copy at {found.gpa:#x} holds another text now")
        why = validate(c.fields, translator(ram.read_phys, roots, ram.phys_limit), ram.read_phys, ram.phys_limit)
        if why:
            return NotFound(f"VMCOREINFO copy at {found.gpa:#x} no longer matches the running kernel: {why}")
    return replace(found, stats=ScanStats(bytes_read=COPY_SPAN, seconds=time.monotonic() - started,
                                          complete=False, stopped="revalidated"))
