"""The dump engine (vmcorefs.dump) without QEMU: a memfd standing in for a
shared backend and an anonymous mapping of this process for private RAM
(read through our own /proc/self/mem and /proc/self/pagemap), written into
a file and compared with what the layout says, byte for byte."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import zlib
from pathlib import Path
from typing import Any

import pytest
from unit_support import fake_cpu_notes, fake_mem

from vmcorefs.core.elf import DumpInfo
from vmcorefs.core.kdump import UTSNAME_SIZE, uts_looks_sane
from vmcorefs.core.layout import PAGE_SIZE, ExtentKind
from vmcorefs.core.memmap import GuestPhysBlock
from vmcorefs.dump import Makedumpfile, _NoProgress, _Watch, check_filter, copy_runs, plan
from vmcorefs.errors import UsageError
from vmcorefs.qemu.guest import Snapshot
from vmcorefs.qemu.memory import ProcessMemory, Source
from vmcorefs.qemu.scan import HUGE, GuestRAM, zero_pfns

MiB = 1 << 20
IDENT64 = b"\x7fELF\x02\x01\x01" + bytes(9)


@pytest.mark.parametrize(("threads", "chunk"), [(1, 4 * PAGE_SIZE), (2, PAGE_SIZE), (3, 3 * PAGE_SIZE), (2, 4 * MiB)])
def test_copier_writes_exactly_the_nonzero_pages(tmp_path: Path, threads: int, chunk: int) -> None:
    """The native copier against a page-by-page reference: runs of a memfd
    with random bytes anywhere in some pages (a page's ends are tested
    first, its middle needs the compare), a run ending inside a page, any
    number of threads and chunk sizes: the file equals the runs, and only
    the pages that are not all zeros are allocated."""
    import random

    from vmcorefs._readpath import EXT_SHARED, Copier

    rng = random.Random(12)
    npages = 96
    src = bytearray(npages * PAGE_SIZE)
    for _ in range(60):
        src[rng.randrange(len(src))] = rng.randint(1, 255)
    src[5 * PAGE_SIZE:7 * PAGE_SIZE] = os.urandom(2 * PAGE_SIZE)
    memfd = os.memfd_create("fake-guest-ram")
    out = tmp_path / "core"
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        os.pwrite(memfd, src, 0)
        # (file offset, length, source offset): the last run ends 100 bytes into a page.
        pieces = [(0, 40 * PAGE_SIZE, 0), (64 * PAGE_SIZE, 20 * PAGE_SIZE, 40 * PAGE_SIZE),
                  (100 * PAGE_SIZE, 30 * PAGE_SIZE + 100, 60 * PAGE_SIZE)]
        size = 140 * PAGE_SIZE
        os.ftruncate(fd, size)
        copier = Copier(fd, [(o, n, EXT_SHARED, s, memfd) for o, n, s in pieces], 0, chunk)
        copier.run(threads)
        want = bytearray(size)
        nonzero = 0
        for o, n, s in pieces:
            want[o:o + n] = src[s:s + n]
            nonzero += sum(any(src[s + i:s + min(n, i + PAGE_SIZE)]) for i in range(0, n, PAGE_SIZE))
        assert out.read_bytes() == bytes(want)
        assert copier.progress() == (sum(n for _, n, _ in pieces), copier.progress()[1])
        allocated = sum(n for _, n in _data_blocks(fd, size))
        written = copier.progress()[1]
        assert nonzero * PAGE_SIZE - PAGE_SIZE < written <= nonzero * PAGE_SIZE  # the partial page counts its 100 bytes
        assert allocated == -(-written // PAGE_SIZE) * PAGE_SIZE
    finally:
        os.close(fd)
        os.close(memfd)


def test_copier_rejects_what_it_cannot_copy() -> None:
    from vmcorefs import _readpath
    from vmcorefs._readpath import EXT_PREFIX, EXT_SHARED, Copier

    if os.environ.get("VMCOREFS_READPATH_BUILD"):  # make sanitize: the ASan+UBSan build is the one tested
        assert Path(_readpath.__file__).parent == Path(os.environ["VMCOREFS_READPATH_BUILD"])

    with pytest.raises(ValueError, match="kind"):
        Copier(1, [(0, PAGE_SIZE, EXT_PREFIX, 0, 0)])
    with pytest.raises(ValueError, match="chunk"):
        Copier(1, [(0, PAGE_SIZE, EXT_SHARED, 0, 0)], 0, 1000)
    copier = Copier(1, [])
    copier.run()
    with pytest.raises(RuntimeError):
        copier.run()  # once


def _snapshot(blocks: list[GuestPhysBlock], sources: list[Source]) -> Snapshot:
    return Snapshot.build(blocks, sources, DumpInfo(IDENT64, 62, 0, fake_cpu_notes(2), True), alive=lambda: True)


def _expected(snap: Snapshot, read: dict[int, bytes]) -> bytes:
    """The whole file as the layout defines it; ``read[gpa]`` is each block's bytes."""
    out = bytearray(snap.vmcore.size)
    out[:len(snap.vmcore.prefix)] = snap.vmcore.prefix
    for seg in snap.vmcore.segments:
        out[seg.offset:seg.end] = read[seg.src]
    return bytes(out)


def _data_blocks(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data ranges of a file (SEEK_DATA/SEEK_HOLE)."""
    out, off = [], 0
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, hole - data))
        off = hole
    return out


def test_shared_backend_sparse_and_exact(tmp_path: Path) -> None:
    """A memfd with holes, data pages and data pages of zeros: the file
    equals the layout byte for byte; only the non-zero data is allocated."""
    memfd = os.memfd_create("fake-guest-ram")
    try:
        size = 12 * MiB
        os.ftruncate(memfd, size)
        written = {0: fake_mem(0, 64 * 1024), 3 * MiB + 8192: fake_mem(7, 3 * PAGE_SIZE),
                   9 * MiB: fake_mem(1, MiB)}
        for off, data in written.items():
            os.pwrite(memfd, data, off)
        os.pwrite(memfd, bytes(MiB), 5 * MiB)  # allocated, but zeros
        blocks = [GuestPhysBlock(0, 8 * MiB, 0x7F00_0000_0000, "ram", "ram"),
                  GuestPhysBlock(1 << 32, 4 * MiB, 0x7F00_0080_0000, "ram", "ram")]
        sources = [Source(blocks[0], memfd, 0, ExtentKind.SHARED, "memfd"),
                   Source(blocks[1], memfd, 8 * MiB, ExtentKind.SHARED, "memfd")]
        snap = _snapshot(blocks, sources)
        with GuestRAM(ProcessMemory(os.getpid()), snap.sources) as ram:
            p = plan(snap, snap.vmcore, ram)
            assert p.populated == 64 * 1024 + 3 * PAGE_SIZE + 1 * MiB + MiB  # the zero MiB is data too
            out = tmp_path / "core"
            fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            try:
                copy_runs(fd, p, ram, _Watch(None), _NoProgress())
                got = out.read_bytes()
                want = _expected(snap, {0: os.pread(memfd, 8 * MiB, 0), 1 << 32: os.pread(memfd, 4 * MiB, 8 * MiB)})
                assert got == want
                # Allocated: the prefix page(s) and the three written ranges, nothing else.
                seg0, seg1 = snap.vmcore.segments
                data = _data_blocks(fd, len(got))
                assert sum(n for _, n in data) <= len(p.prefix) + PAGE_SIZE + 64 * 1024 + 3 * PAGE_SIZE + MiB + 3 * 4096
                assert all(not (seg0.offset + 5 * MiB <= off < seg0.offset + 6 * MiB) for off, _ in data)
                assert any(off <= seg1.offset + MiB < off + n for off, n in data)
            finally:
                os.close(fd)
    finally:
        os.close(memfd)


def _pagemap_present(addr: int, npages: int) -> list[bool]:
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        raw = os.pread(f.fileno(), 8 * npages, addr // PAGE_SIZE * 8)
    return [bool(int.from_bytes(raw[8 * i:8 * i + 8], "little") >> 63) for i in range(npages)]


def test_private_ram_reads_only_populated_pages(tmp_path: Path) -> None:
    """Private RAM (our own anonymous mapping through /proc/self/mem): pages
    never touched are neither read nor faulted in, pages mapping the zero
    page are not read; written pages are copied exactly; written zeros leave
    holes."""
    npages = 512
    m = mmap.mmap(-1, npages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    try:
        touched = {3: b"\x11", 4: b"\x22", 100: b"\x33", 511: b"\x44"}
        for page, byte in touched.items():
            m[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = byte * PAGE_SIZE
        m[200 * PAGE_SIZE] = 0  # a written zero: present, data, all zeros
        _ = m[300 * PAGE_SIZE]  # a read: the zero page mapped, no data (skipped when its PFN is known)
        zero_pfn_known = zero_pfns()[0] != 0
        block = GuestPhysBlock(0, npages * PAGE_SIZE, addr, "ram", "ram")
        memory = ProcessMemory(os.getpid(), "procmem")
        try:
            snap = _snapshot([block], memory.sources([block]))
            with GuestRAM(memory, snap.sources) as ram:
                p = plan(snap, snap.vmcore, ram)
                assert p.populated == (len(touched) + 1 + (not zero_pfn_known)) * PAGE_SIZE
                out = tmp_path / "core"
                fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL)
                try:
                    copy_runs(fd, p, ram, _Watch(None), _NoProgress())
                    data = _data_blocks(fd, snap.vmcore.size)
                finally:
                    os.close(fd)
            # Nothing faulted in by the dump (checked before bytes(m) below reads it all).
            present = _pagemap_present(addr, npages)
            assert [i for i, x in enumerate(present) if x] == sorted([*touched, 200, 300])
            assert out.read_bytes() == _expected(snap, {0: bytes(m)})
            (seg,) = snap.vmcore.segments
            assert all(not (off <= seg.offset + 200 * PAGE_SIZE < off + n) for off, n in data)
        finally:
            memory.close()
    finally:
        m.close()


def test_stop_and_write_errors(tmp_path: Path) -> None:
    """A stop request ends the copy early; a failed write is raised."""
    memfd = os.memfd_create("fake-guest-ram")
    try:
        os.ftruncate(memfd, 16 * MiB)
        os.pwrite(memfd, fake_mem(0, 16 * MiB), 0)
        block = GuestPhysBlock(0, 16 * MiB, 0x7F00_0000_0000, "ram", "ram")
        snap = _snapshot([block], [Source(block, memfd, 0, ExtentKind.SHARED, "memfd")])
        with GuestRAM(ProcessMemory(os.getpid()), snap.sources) as ram:
            p = plan(snap, snap.vmcore, ram)
            watch = _Watch(None)
            watch.stop.set()
            fd = os.open(tmp_path / "stopped", os.O_RDWR | os.O_CREAT)
            try:
                assert copy_runs(fd, p, ram, watch, _NoProgress()) == len(p.prefix)
            finally:
                os.close(fd)
            with open("/dev/full", "wb") as full:
                with pytest.raises(OSError):
                    copy_runs(full.fileno(), p, ram, _Watch(None), _NoProgress())
    finally:
        os.close(memfd)


def _read_kdump(path: Path) -> tuple[dict[str, Any], dict[int, bytes]]:
    """A minimal reader of a kdump-compressed file, written from the format
    description (header, sub-header, bitmap 2, descriptors): header fields
    and every dumped page by PFN."""
    import struct

    data = path.read_bytes()
    assert data[:8] == b"KDUMP   "
    (version,) = struct.unpack_from("<I", data, 8)
    status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr = struct.unpack_from("<IIIII", data, 424)
    (nr_cpus,) = struct.unpack_from("<I", data, 460)
    phys_base, level = struct.unpack_from("<Qi", data, block_size)
    off_vci, size_vci, off_note, size_note = struct.unpack_from("<QQQQ", data, block_size + 32)
    (max_mapnr_64,) = struct.unpack_from("<Q", data, block_size + 96)
    bitmap_off = (1 + sub_hdr_size) * block_size
    half = bitmap_blocks * block_size // 2
    bitmap1 = data[bitmap_off:bitmap_off + half]
    bitmap2 = data[bitmap_off + half:bitmap_off + 2 * half]
    desc = bitmap_off + 2 * half
    pages = {}
    flags_seen = set()
    for pfn in range(max_mapnr_64):
        if bitmap2[pfn >> 3] >> (pfn & 7) & 1:
            offset, size, flags, _ = struct.unpack_from("<QIIQ", data, desc)
            desc += 24
            raw = data[offset:offset + size]
            flags_seen.add(flags)
            pages[pfn] = _DECOMPRESS[flags](raw) if flags else raw
            assert len(pages[pfn]) == block_size
    assert bitmap1 == bitmap2
    fields = dict(version=version, status=status, block_size=block_size, max_mapnr=max_mapnr, nr_cpus=nr_cpus,
                  phys_base=phys_base, level=level, size_vci=size_vci, size_note=size_note,
                  max_mapnr_64=max_mapnr_64, note_at=off_note, vci_at=off_vci, flags=sorted(flags_seen))
    return fields, pages


def _decompress_lzo(raw: bytes) -> bytes:
    import lzo

    return bytes(lzo.decompress(raw, False, PAGE_SIZE))


def _decompress_snappy(raw: bytes) -> bytes:
    import cramjam

    return bytes(cramjam.snappy.decompress_raw(raw))


#: A page descriptor's flags -> its decompressor (makedumpfile's DUMP_DH_COMPRESSED_*).
_DECOMPRESS = {1: zlib.decompress, 2: _decompress_lzo, 4: _decompress_snappy}


@pytest.mark.parametrize(("fmt", "status"), [("kdump-zlib", 1), ("kdump-lzo", 2), ("kdump-snappy", 4)])
def test_kdump_writer_round_trip(tmp_path: Path, fmt: str, status: int) -> None:
    """The sparse ELF of two blocks (zero pages, holes, compressible and
    incompressible pages) converted to each kdump format: every page of
    every block is there, equal to the ELF's, compressed with the format's
    flag (incompressible pages raw); zero pages share one stored page; the
    notes and VMCOREINFO are where the sub-header says."""
    from vmcorefs.dump import write_kdump

    vmcoreinfo = (b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nNUMBER(phys_base)=-442499072\n"
                  b"SYMBOL(init_uts_ns)=ffffffff9e613220\nOFFSET(uts_namespace.name)=4\n")
    memfd = os.memfd_create("fake-guest-ram")
    try:
        os.ftruncate(memfd, 6 * MiB)
        os.pwrite(memfd, fake_mem(0, 64 * 1024), 0)
        os.pwrite(memfd, os.urandom(3 * PAGE_SIZE), 2 * MiB + 4 * PAGE_SIZE)  # does not compress
        os.pwrite(memfd, bytes(MiB), 3 * MiB)  # zeros, allocated
        blocks = [GuestPhysBlock(0, 4 * MiB, 0x7F00_0000_0000, "ram", "ram"),
                  GuestPhysBlock(5 * MiB, 2 * MiB, 0x7F00_0040_0000, "ram", "ram")]
        sources = [Source(blocks[0], memfd, 0, ExtentKind.SHARED, "memfd"),
                   Source(blocks[1], memfd, 4 * MiB, ExtentKind.SHARED, "memfd")]
        snap = Snapshot.build(blocks, sources, DumpInfo(IDENT64, 62, 0, fake_cpu_notes(2, vmcoreinfo), True),
                              alive=lambda: True)
        elf, out = tmp_path / "core.elf", tmp_path / "core.kdump"
        with GuestRAM(ProcessMemory(os.getpid()), snap.sources) as ram:
            p = plan(snap, snap.vmcore, ram)
            fd = os.open(elf, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            dst = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            try:
                copy_runs(fd, p, ram, _Watch(None), _NoProgress())
                write_kdump(fd, dst, snap.vmcore, snap, fmt, _Watch(None), _NoProgress())
            finally:
                os.close(fd)
                os.close(dst)
        fields, pages = _read_kdump(out)
        assert fields["version"] == 6 and fields["status"] == status and fields["block_size"] == PAGE_SIZE
        assert fields["max_mapnr_64"] == 7 * MiB // PAGE_SIZE and fields["nr_cpus"] == 2
        assert fields["flags"] == [0, status]  # the random pages raw, the others compressed
        assert fields["phys_base"] == -442499072 % (1 << 64) and fields["level"] == 0
        raw = out.read_bytes()
        # init_uts_ns is outside this guest's RAM: a utsname made from VMCOREINFO that readers accept.
        assert uts_looks_sane(raw[12:12 + UTSNAME_SIZE]) and b"6.1.0-test" in raw[12:12 + UTSNAME_SIZE]
        notes = snap.dump.notes
        assert raw[fields["note_at"]:fields["note_at"] + fields["size_note"]] == notes
        assert raw[fields["vci_at"]:fields["vci_at"] + fields["size_vci"]].rstrip(b"\0") == vmcoreinfo
        ram_bytes = {0: os.pread(memfd, 4 * MiB, 0), 5 * MiB: os.pread(memfd, 2 * MiB, 4 * MiB)}
        want = {(gpa + off) // PAGE_SIZE: data[off:off + PAGE_SIZE]
                for gpa, data in ram_bytes.items() for off in range(0, len(data), PAGE_SIZE)}
        assert pages == want
        # Zero pages are stored once: the file holds the non-zero pages, compressed, and little else.
        assert len(raw) < 200 * 1024
    finally:
        os.close(memfd)


# -- check_filter: makedumpfile's page classification vs the kernel's ----------------

#: VMCOREINFO of a kernel before 6.10 (PG_slab a page flag) and after (a page type).
VMCI_61 = {"OSRELEASE": "6.1.0-28-cloud-amd64", "NUMBER(PG_slab)": "9",
           "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)": "-129"}
VMCI_612 = {"OSRELEASE": "6.12.95+deb12-cloud-amd64", "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)": "-1024",
            "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)": "-129"}


@pytest.mark.parametrize(("version", "level", "vmcoreinfo", "refused"), [
    ((1, 7, 2), 31, VMCI_612, True),     # Debian 12's makedumpfile on a 6.10+ kernel, -d 8 in the level
    ((1, 7, 2), 8, VMCI_612, True),
    ((1, 7, 5), 31, VMCI_612, True),
    ((1, 7, 2), 23, VMCI_612, False),    # 31 without user pages: slab pages are never dropped
    ((1, 7, 2), 17, VMCI_612, False),
    ((1, 7, 6), 31, VMCI_612, False),    # knows the slab page type
    ((1, 8), 31, VMCI_612, False),
    ((1, 7, 2), 31, VMCI_61, False),     # PG_slab still a flag: 1.7.2 sees it
    ((1, 7, 2), 31, None, False),        # no VMCOREINFO: makedumpfile fails on its own
    ((), 31, VMCI_612, False),           # version not printed: not guessed
])
def test_check_filter(version: tuple[int, ...], level: int, vmcoreinfo: dict[str, str] | None,
                      refused: bool) -> None:
    mdf = Makedumpfile(["makedumpfile", "-c", "-d", str(level)], version)
    if not refused:
        check_filter(mdf, level, vmcoreinfo)
        return
    with pytest.raises(UsageError) as e:
        check_filter(mdf, level, vmcoreinfo)
    msg = str(e.value)
    assert f"--filter {level}:" in msg and f"makedumpfile {'.'.join(map(str, version))}" in msg, msg
    assert f"use --filter {level & ~8} " in msg and "6.12.95+deb12-cloud-amd64" in msg, msg


def _merged(runs: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for off, n, kind in runs:
        if out and out[-1][0] + out[-1][1] == off and out[-1][2] == kind:
            out[-1] = (out[-1][0], out[-1][1] + n, kind)
        else:
            out.append((off, n, kind))
    return out


def test_pagemap_scan_runs_equal_pagemap_entries() -> None:
    """GuestRAM.populated of private RAM by the PAGEMAP_SCAN ioctl (Linux
    6.7+) gives the runs that reading every pagemap entry gives: written
    pages, not untouched ones, not the zero page, not the huge zero page."""
    size = 16 * MiB
    m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    off = -base % HUGE  # a 2 MiB aligned block, so THP can back it
    try:
        with contextlib.suppress(OSError):
            m.madvise(mmap.MADV_HUGEPAGE, off + 8 * MiB, 8 * MiB)
        for page in (0, 1, 2, 7, 100, 101, 1023):
            m[off + page * PAGE_SIZE] = 1
        _ = m[off + 50 * PAGE_SIZE]  # the zero page
        _ = m[off + 8 * MiB]  # the huge zero page where THP and its zero page are on
        m[off + 12 * MiB + 5] = 1  # a THP (or a page) of data
        block = GuestPhysBlock(0, size, base + off, "ram", "ram")
        memory = ProcessMemory(os.getpid(), "procmem")
        try:
            (src,) = memory.sources([block])
            with GuestRAM(memory, [src]) as scan, GuestRAM(memory, [src]) as entries:
                entries._scan_ok = False
                by_entries = _merged(list(entries.populated(src)))
                require_scan = scan._scan_regions(src.base, size) is not None
                by_scan = _merged(list(scan.populated(src)))
            assert by_scan == by_entries, (by_scan, by_entries)
            assert by_entries[0] == (0, 3 * PAGE_SIZE, "resident")
            assert all(not (o <= 50 * PAGE_SIZE < o + n) for o, n, _ in by_entries)
            if not require_scan:
                pytest.skip("this kernel has no PAGEMAP_SCAN (Linux < 6.7): only the entry path ran")
        finally:
            memory.close()
    finally:
        m.close()


def test_pagemap_scan_over_many_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sparse 4 GiB mapping whose 64 runs take several PAGEMAP_SCAN calls
    of 10 regions: the same runs as the pagemap entries say."""
    monkeypatch.setattr("vmcorefs.qemu.scan.SCAN_REGIONS", 10)
    size = 4 << 30
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)  # MAP_NORESERVE
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    try:
        for i in range(0, size, 64 * MiB):
            m[i + (i // (64 * MiB)) * PAGE_SIZE % (64 * MiB)] = 1
        block = GuestPhysBlock(0, size, base, "ram", "ram")
        memory = ProcessMemory(os.getpid(), "procmem")
        try:
            (src,) = memory.sources([block])
            with GuestRAM(memory, [src]) as scan, GuestRAM(memory, [src]) as entries:
                entries._scan_ok = False
                by_entries = list(entries.populated(src))
                by_scan = list(scan.populated(src))
            assert len(by_entries) == 64 and by_scan == by_entries
        finally:
            memory.close()
    finally:
        m.close()


def test_kdump_zlib_pages_no_bigger_than_zlib_level_1() -> None:
    """kdump-zlib keeps the shorter of ISA-L's and zlib's level 1 (QEMU's and
    makedumpfile's), and stores pages nothing shrinks raw, as they do."""
    from vmcorefs.dump import codec

    c = codec("kdump-zlib")
    text = Path(__file__).read_bytes() * 3
    pages = [text[i:i + PAGE_SIZE] for i in range(0, len(text) - PAGE_SIZE, 1000)]
    pages += [fake_mem(i, PAGE_SIZE) for i in range(20)] + [os.urandom(PAGE_SIZE) for _ in range(20)]

    def stored(n: int) -> int:
        return n if n < PAGE_SIZE else PAGE_SIZE

    for page in pages:
        ours = c.compress(page)
        assert stored(len(ours)) <= stored(len(zlib.compress(page, 1)))
        if len(ours) < PAGE_SIZE:
            assert zlib.decompress(ours) == page


@pytest.mark.parametrize(("rows", "cols"), [(0, 0), (30, 0), (0, 100), (30, 100)])
def test_progress_bar_on_a_terminal_of_any_reported_size(monkeypatch: pytest.MonkeyPatch, rows: int,
                                                         cols: int) -> None:
    """A pty that reports 0 rows or columns (nobody sized it, e.g. ``script``
    run without a terminal) still gets a whole bar with the bytes done."""
    import fcntl
    import pty
    import struct
    import sys
    import termios

    from vmcorefs.dump import _progress

    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        with open(slave, "w", closefd=False) as tty:
            monkeypatch.setattr(sys, "stderr", tty)
            bar = _progress(False, 8 * MiB, "copying")
            bar.update(4 * MiB)
            bar.close()
            tty.flush()
        os.set_blocking(master, False)
        out = os.read(master, 65536).decode(errors="replace")
        first = out.split("\r")[1]  # the first draw (tqdm redraws at most every 0.1 s)
        assert first.startswith("copying:") and "0.00/8.00M [" in first and first.rstrip().endswith("]"), out
    finally:
        os.close(master)
        os.close(slave)
