"""The I/O side of the VMCOREINFO finder (qemu/scan.py) on synthetic guest
memory held by this process: a sparse memfd (shared RAM: SEEK_DATA/HOLE)
and private anonymous memory of our own (pagemap; /proc/self/mem).  What
the host never populated must be neither read nor faulted in."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from vmcoreinfo_support import CPU, Image, Kernel, boot, note_bytes, put_pair

from vmcorefs.core.layout import ExtentKind
from vmcorefs.core.memmap import GuestPhysBlock
from vmcorefs.core.layout import PAGE_SIZE
from vmcorefs.core.vmcoreinfo import Found, NotFound
from vmcorefs.errors import GuestMemoryError
from vmcorefs.qemu.memory import ProcessMemory, Source
from vmcorefs.qemu import scan as scan_module
from vmcorefs.qemu.scan import HUGE, PM_PRESENT, GuestRAM, ScanLimits, find_vmcoreinfo, revalidate, zero_pfns

SIZE = 64 << 20
GPA = 0x100000  # the block starts above the first MiB, as pc.ram's second block does
NOTE_AT, TEXT_AT = GPA + 0x10EA000, GPA + 0x188B000
STALE_NOTE, STALE_TEXT = GPA + 0x400000, GPA + 0x401000
STRADDLING = GPA + 0x600000  # a two-page note whose second page was never populated


@dataclass
class Guest:
    """Synthetic guest RAM ``[GPA, GPA + SIZE)`` in one block."""

    memory: ProcessMemory
    sources: list[Source]
    cpus: list[CPU]
    image: Image
    text: str
    kinds: str

    def populated_pages(self) -> int:
        return len([p for p in self.image.pages if GPA <= p < GPA + SIZE])


def _image(stale: bool = True) -> tuple[Image, str, int]:
    img = Image()
    live = boot(img, Kernel(load=0x2000000))
    put_pair(img, live, NOTE_AT, TEXT_AT)
    if stale:
        old = boot(img, Kernel(koff=0x1C00000, load=0x3000000))
        put_pair(img, old, STALE_NOTE, STALE_TEXT)
        big = live.text + "".join(f"SYMBOL(padding_{i:04d})=ffffffff82000000\n" for i in range(120))
        img.write(STRADDLING, note_bytes(big))
        img.hole(STRADDLING + PAGE_SIZE)
    return img, live.text, live.root


def _address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def _pagemap(addr: int, npages: int) -> list[int]:
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        raw = os.pread(f.fileno(), 8 * npages, addr // PAGE_SIZE * 8)
    return [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]


@pytest.fixture(params=["shared", "procmem"])
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    img, text, root = _image()
    memory = ProcessMemory(os.getpid(), "procmem")
    cpus = [CPU(root)]
    if request.param == "shared":
        fd = os.memfd_create("vmcorefs-test-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE)
        for base, page in img.pages.items():
            os.pwrite(fd, bytes(page), base - GPA)
        block = GuestPhysBlock(GPA, SIZE, 0x7F0000000000, "mem0", "ram")
        blocks = os.fstat(fd).st_blocks
        try:
            yield Guest(memory, [Source(block, fd, 0, ExtentKind.SHARED, "/memfd:ram")], cpus, img, text, "shared")
            assert os.fstat(fd).st_blocks == blocks, "the scan allocated memfd pages"
        finally:
            os.close(fd)
            memory.close()
        return
    m = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)  # one touched page must not populate 2 MiB
    hva = _address(m)
    for base, page in img.pages.items():
        m[base - GPA:base - GPA + PAGE_SIZE] = bytes(page)
    for i in range(0, 16 << 20, 1 << 20):  # read-only touches map the zero page: no data
        _ = m[(40 << 20) + i]
    mem_fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    block = GuestPhysBlock(GPA, SIZE, hva, "pc.ram", "ram")
    try:
        yield Guest(memory, [Source(block, mem_fd, hva, ExtentKind.PROCMEM, "/proc/self/mem")], cpus, img, text,
                    "procmem")
        assert all(e & PM_PRESENT == 0 or e & ((1 << 55) - 1) in (0, zero_pfns()[0])
                   for i, e in enumerate(_pagemap(hva, SIZE // PAGE_SIZE)) if GPA + i * PAGE_SIZE not in img.pages), \
            "the scan faulted in memory that held no data"
    finally:
        os.close(mem_fd)
        memory.close()
        m.close()


def test_finds_the_live_pair_reading_only_populated_pages(guest: Guest) -> None:
    r = find_vmcoreinfo(guest.memory, guest.sources, guest.cpus, ScanLimits(stop_at_pair=False, chunk=1 << 16))
    assert isinstance(r, Found), r
    assert (r.text, r.gpa, r.form, r.twin_gpa, r.others) == (guest.text, NOTE_AT, "note", TEXT_AT, ())
    assert sorted(x.gpa for x in r.rejected) == [STALE_NOTE, STALE_TEXT, STRADDLING]
    assert "shorter than n_descsz" in r.rejected[-1].reason
    assert r.stats.complete and r.stats.hits == 5
    populated = guest.populated_pages() * PAGE_SIZE
    assert r.stats.bytes_read == populated, (r.stats, populated)
    assert r.stats.bytes_read + r.stats.bytes_skipped == SIZE


def test_stops_at_the_pair(guest: Guest) -> None:
    r = find_vmcoreinfo(guest.memory, guest.sources, guest.cpus, ScanLimits(chunk=1 << 16))
    assert isinstance(r, Found) and r.gpa == NOTE_AT
    assert not r.stats.complete and r.stats.stopped == "validated Linux's note and text pair"
    assert r.stats.bytes_read < guest.populated_pages() * PAGE_SIZE  # the kernel image was not read


def test_bounds(guest: Guest) -> None:
    r = find_vmcoreinfo(guest.memory, guest.sources, guest.cpus, ScanLimits(max_bytes=2 * PAGE_SIZE, chunk=1 << 16))
    assert isinstance(r, NotFound), r  # only the stale pair (the first populated pages) was read
    assert r.reason.startswith("2 copies of VMCOREINFO in 8 KiB of populated guest RAM, none is the running")
    assert r.reason.endswith("; the scan stopped early: read 8192 bytes (max_bytes)")
    assert r.stats.bytes_read == 2 * PAGE_SIZE and not r.stats.complete
    r = find_vmcoreinfo(guest.memory, guest.sources, guest.cpus, ScanLimits(max_seconds=0))
    assert isinstance(r, NotFound) and "(max_seconds)" in r.reason and r.stats.bytes_read == 0


def test_needs_page_tables(guest: Guest) -> None:
    r = find_vmcoreinfo(guest.memory, guest.sources, [CPU(0)])
    assert isinstance(r, NotFound) and "no vCPU has paging enabled" in r.reason


def test_revalidate(guest: Guest) -> None:
    found = find_vmcoreinfo(guest.memory, guest.sources, guest.cpus)
    assert isinstance(found, Found)
    again = revalidate(found, guest.memory, guest.sources, guest.cpus)
    assert isinstance(again, Found) and again.text == found.text and again.gpa == found.gpa
    assert again.stats.stopped == "revalidated"
    # Another kernel's page tables (a reboot with other KASLR offsets): same bytes, no longer valid.
    img2 = Image()
    other = boot(img2, Kernel(koff=0x1C00000, load=0x3000000))
    r = revalidate(found, guest.memory, guest.sources, [CPU(other.root)])
    assert isinstance(r, NotFound) and "no longer matches the running kernel" in r.reason
    # The page now holds something else.
    _write(guest, NOTE_AT, note_bytes(guest.text.replace("6.1.0-57", "6.1.0-58")))
    r = revalidate(found, guest.memory, guest.sources, guest.cpus)
    assert isinstance(r, NotFound) and "holds another text" in r.reason
    _write(guest, NOTE_AT, bytes(PAGE_SIZE))
    r = revalidate(found, guest.memory, guest.sources, guest.cpus)
    assert isinstance(r, NotFound) and "changed: not a VMCOREINFO note header" in r.reason
    r = revalidate(found, guest.memory, guest.sources, [])
    assert isinstance(r, NotFound) and "paging" in r.reason


def _write(guest: Guest, gpa: int, data: bytes) -> None:
    src = guest.sources[0]
    if guest.kinds == "shared":
        os.pwrite(src.fd, data, gpa - GPA)
    else:
        ctypes.memmove(src.base + gpa - GPA, data, len(data))
    guest.image.write(gpa, data)


def test_read_phys(guest: Guest) -> None:
    with GuestRAM(guest.memory, guest.sources) as ram:
        assert ram.phys_limit == GPA + SIZE
        assert ram.read_phys(NOTE_AT, 100) == guest.image.read(NOTE_AT, 100)
        assert ram.read_phys(NOTE_AT - 10, 3 * PAGE_SIZE) == guest.image.read(NOTE_AT - 10, 3 * PAGE_SIZE)
        assert ram.read_phys(GPA + SIZE - 8, 100) == bytes(8)  # short at the block's end
        assert ram.read_phys(GPA + (50 << 20), PAGE_SIZE) == bytes(PAGE_SIZE)  # never populated
        with pytest.raises(GuestMemoryError):
            ram.read_phys(GPA - PAGE_SIZE, 8)
        with pytest.raises(GuestMemoryError):
            ram.read_phys(GPA + SIZE, 8)
        runs = [(d, n, k) for d, n, k in ram.populated(guest.sources[0])]
        assert sum(n for _, n, _ in runs) == guest.populated_pages() * PAGE_SIZE
        assert all(k == "resident" for _, _, k in runs)
        assert [d for d, _, _ in runs] == sorted(d for d, _, _ in runs)


def test_no_copies() -> None:
    img = Image()
    live = boot(img, Kernel(load=0x2000000))
    fd = os.memfd_create("vmcorefs-test-ram", os.MFD_CLOEXEC)
    memory = ProcessMemory(os.getpid(), "procmem")
    try:
        os.ftruncate(fd, SIZE)
        for base, page in img.pages.items():
            os.pwrite(fd, bytes(page), base - GPA)
        src = Source(GuestPhysBlock(GPA, SIZE, 0, "mem0", "ram"), fd, 0, ExtentKind.SHARED, "/memfd:ram")
        r = find_vmcoreinfo(memory, [src], [CPU(live.root)])
        assert isinstance(r, NotFound) and r.reason == f"no copy of VMCOREINFO in {len(img.pages) * 4} KiB of populated guest RAM"
        assert r.stats.bytes_read == len(img.pages) * PAGE_SIZE
        assert r.stats.complete
    finally:
        os.close(fd)
        memory.close()


def test_zero_pfns_are_known_as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("PFNs in /proc/self/pagemap need CAP_SYS_ADMIN")
    small, huge = zero_pfns()
    assert small > 0 and huge != small


def _entries(*ents: int) -> bytes:
    return b"".join(e.to_bytes(8, "little") for e in ents)


def test_zero_page_entries() -> None:
    """Present entries mapping the zero page, or the huge zero page from its
    head on, hold no data; nothing else is taken for them."""
    small, huge = 0x3B32, 0x18B000
    soft_dirty = 1 << 55
    ents = [0, PM_PRESENT | small, PM_PRESENT | 0x3B33, small, PM_PRESENT | soft_dirty | small,
            *(PM_PRESENT | (huge + i) for i in range(512)), PM_PRESENT | (huge + 512),
            PM_PRESENT | (huge + 5), PM_PRESENT | (small << 8), PM_PRESENT | (small << 16) | 0x55]
    raw = _entries(*ents)
    assert list(scan_module._zero_page_entries(raw, small, huge)) == [1, 4, *range(5, 517)]
    assert list(scan_module._zero_page_entries(raw, small, 0)) == [1, 4]
    assert list(scan_module._zero_page_entries(raw, 0, 0)) == []
    # A huge zero page whose head is before the window: not recognised (read as data).
    assert list(scan_module._zero_page_entries(_entries(*ents[6:]), small, huge)) == []


def test_pagemap_kinds_of_our_own_memory() -> None:
    """Untouched, written, zero-page and huge-zero-page memory of ours, as
    GuestRAM sees it through /proc/self/pagemap."""
    small, huge = zero_pfns()
    if not small:
        pytest.skip("PFNs hidden in /proc/self/pagemap (needs CAP_SYS_ADMIN)")
    m = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        base = _address(m)
        off = -base % HUGE  # a 2 MiB-aligned window of 4 MiB
        m.madvise(mmap.MADV_NOHUGEPAGE, off, HUGE)
        m.madvise(mmap.MADV_HUGEPAGE, off + HUGE, HUGE)
        m[off + 5 * PAGE_SIZE] = 1                 # written: data
        _ = m[off + 7 * PAGE_SIZE]                 # read: the zero page
        _ = m[off + HUGE + 3 * PAGE_SIZE]          # read in a THP region: the huge zero page (if THP allows)
        block = GuestPhysBlock(0, 2 * HUGE, base + off, "pc.ram", "ram")
        mem_fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
        memory = ProcessMemory(os.getpid(), "procmem")
        try:
            with GuestRAM(memory, [Source(block, mem_fd, base + off, ExtentKind.PROCMEM, "/proc/self/mem")]) as ram:
                runs = list(ram.populated(ram.sources[0]))
                huge_mapped = _pagemap(base + off + HUGE, 1)[0] & ((1 << 55) - 1) == huge != 0
                assert runs == [(5 * PAGE_SIZE, PAGE_SIZE, "resident")] + ([] if huge_mapped else [(HUGE, HUGE, "resident")])
                assert ram.read_phys(5 * PAGE_SIZE, 2) == b"\x01\0" and ram.read_phys(7 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
        finally:
            os.close(mem_fd)
            memory.close()
    finally:
        m.close()
