"""``vmcorefs dump``: a point-in-time core file of a running guest.

The file is what ``MNT/vmcore`` serves (the same :class:`~vmcorefs.live.LiveCore`
opens ``vmcore`` and gives its layout and QEMU's notes), written once:

* ``--format elf`` (default): ELF64 ``ET_CORE``, program headers at offset
  64, the ``PT_LOAD`` set, bytes and notes of ``dump-guest-memory
  paging=false`` of the same paused instant -- written **sparse**: only
  pages that hold data are written, everything else is a file hole, so the
  file's allocated size is about the guest's populated RAM.
* ``--format kdump-zlib|kdump-lzo|kdump-snappy`` (QEMU's names): the
  kdump-compressed format, made from the sparse ELF (written next to
  OUTPUT, removed after) once the guest is resumed, by :func:`write_kdump`
  (every page, zero pages stored once, two compressing threads; zlib,
  LZO1X-1 or raw snappy per page, :func:`codec`; :mod:`vmcorefs.core.kdump`
  lays the file out).  ``--filter LEVEL`` is makedumpfile's ``-d LEVEL``
  (with any format; with ``elf``: ``makedumpfile -E``): page
  classification is makedumpfile's own.

What is read, and how (never an mmap of guest RAM, nothing faulted in):
shared backends (memfd, file) only in the ranges ``SEEK_DATA``/``SEEK_HOLE``
report, private RAM only in pages ``/proc/PID/pagemap`` says hold data (not
never-touched, not mapped to the zero page) -- both from
:class:`vmcorefs.qemu.scan.GuestRAM`; the copy is native
(:class:`vmcorefs._readpath.Copier`): one thread per core takes the next
4 MiB of a run, reads it (``process_vm_readv`` of QEMU, ``pread`` of the
shared file) into a buffer of its own, and ``pwrite``s its pages that are
not all zeros at their file offsets.  The kernel cannot
``copy_file_range`` from a memfd (QEMU's internal tmpfs) to another file
system (EXDEV), and a splice would write the zero pages a guest keeps in
touched memory; the read + zero test keeps the file sparser.  Memory use
is bounded by the buffers (4 MiB per thread).

Consistency: the guest is paused from the snapshot (notes) to the last
byte and resumed after, only if it was running (``LiveCore(freeze=True)``);
``--live`` copies without pausing (a fuzzy image).  The output is written
to a hidden temporary file in OUTPUT's directory and renamed at the end:
on any failure or signal the guest is resumed and no partial file remains.
If this process is killed outright (SIGKILL, the OOM killer), the
``--freeze`` watchdog (:mod:`vmcorefs.watchdog`, quiet) resumes a pause of
ours and removes the partial files it was told about.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from vmcorefs.core.layout import PAGE_SIZE, SparseFile
from vmcorefs.errors import AccessError, QEMUGoneError, QMPError, UsageError, VmcorefsError

if TYPE_CHECKING:  # imported where used: the parser (every vmcorefs command) stays light
    from vmcorefs.qemu.guest import Snapshot
    from vmcorefs.qemu.memory import ProcessMemory, Source
    from vmcorefs.qemu.scan import GuestRAM

#: ``--format`` values, QEMU's ``dump-guest-memory`` format names.
FORMATS = ("elf", "kdump-zlib", "kdump-lzo", "kdump-snappy")
#: makedumpfile's compression option and its ``-v`` feature name per kdump format (``--filter``).
KDUMP = {"kdump-zlib": ("-c", None), "kdump-lzo": ("-l", "lzo"), "kdump-snappy": ("-p", "snappy")}
#: Bytes per read (and per buffer of a copying thread).
CHUNK = 4 << 20
#: Threads copying guest memory (each reads a chunk and writes it): the host's cores, at most 4.
COPY_THREADS = max(1, min(4, len(os.sched_getaffinity(0))))
#: Seconds between progress updates (and checks for a stop) during a copy.
PROGRESS_INTERVAL = 0.05
#: makedumpfile's largest dump level (every page class filtered).
MAX_LEVEL = 31
_ZERO_PAGE = bytes(PAGE_SIZE)


class DumpError(VmcorefsError):
    """The dump could not be written (OUTPUT's file system said why)."""


#: The signals that stop a dump cleanly once it has its guest (resumed,
#: partial file removed, one line, exit 128 + the signal): Ctrl-C, kill,
#: the terminal or ssh session closing under it (SIGHUP), Ctrl-\ (SIGQUIT).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class DumpInterrupted(VmcorefsError):
    """One of :data:`STOP_SIGNALS` stopped a dump; exit 128 + the signal number."""

    def __init__(self, signum: int, detail: str) -> None:
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {detail}")


class Progress(Protocol):
    """Where the copy reports bytes done (a tqdm bar, or nothing)."""

    def update(self, n: int) -> Any: ...

    def close(self) -> None: ...


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Run:
    """``length`` bytes of populated guest memory: ``delta`` bytes into
    ``source``'s block, written at file offset ``offset``."""

    offset: int
    source: Source
    delta: int
    length: int


@dataclass(frozen=True)
class Plan:
    """What a dump writes: the file's ``prefix`` (ELF header, program
    headers, notes), ``size`` in bytes, and the populated ``runs``."""

    prefix: bytes
    size: int
    runs: tuple[Run, ...]

    @property
    def populated(self) -> int:
        """Bytes of guest memory to read (the runs)."""
        return sum(r.length for r in self.runs)


def plan(snap: Snapshot, layout: SparseFile, ram: GuestRAM) -> Plan:
    """The populated runs of ``layout`` (a ``vmcore`` layout of ``snap``:
    one guest-physical segment per block), in file order.

    Costs a ``SEEK_DATA``/``SEEK_HOLE`` walk per shared block and 8 bytes of
    ``/proc/PID/pagemap`` per page of private RAM.  Raises
    :class:`AccessError` when private RAM's pagemap cannot be read (reading
    it blind would fault in every page QEMU never touched),
    :class:`QEMUGoneError`.
    """
    offsets = {seg.src: seg.offset for seg in layout.segments}
    runs: list[Run] = []
    for src in snap.sources:
        base = offsets.get(src.block.gpa)
        if base is None:
            continue
        for delta, length, _kind in ram.populated(src):
            runs.append(Run(base + delta, src, delta, length))
        if ram.blind:
            raise AccessError(f"cannot read /proc/{ram.memory.pid}/pagemap of QEMU",
                              "run as root or with CAP_SYS_PTRACE, or give the guest a shared memory backend")
    runs.sort(key=lambda r: r.offset)
    return Plan(layout.prefix, layout.size, tuple(runs))


class _Watch:
    """Tells whether to stop a copy: a signal arrived, or QEMU exited
    (its pidfd is readable; a memfd outlives QEMU, so reads alone would
    not tell)."""

    def __init__(self, pid: int | None) -> None:
        self.signum = 0
        self.stop = threading.Event()
        self._poll: select.poll | None = None
        self._pidfd = -1
        if pid is not None:
            with contextlib.suppress(OSError):
                self._pidfd = os.pidfd_open(pid)
                self._poll = select.poll()
                self._poll.register(self._pidfd, select.POLLIN)

    def qemu_exited(self) -> bool:
        return self._poll is not None and bool(self._poll.poll(0))

    def check(self) -> None:
        """Raise :class:`QEMUGoneError` once QEMU exited; the caller checks ``stop``."""
        if self.qemu_exited():
            raise QEMUGoneError("QEMU exited during the dump")

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def copy_runs(fd: int, p: Plan, ram: GuestRAM, watch: _Watch, progress: Progress) -> int:
    """Write ``p`` into ``fd`` (an empty regular file): the prefix, the
    populated runs minus their all-zero pages, holes elsewhere; the file
    ends at ``p.size``.  Returns the bytes written.

    The copy is native (:class:`vmcorefs._readpath.Copier`, without the
    GIL): ``COPY_THREADS`` threads each take the next ``CHUNK`` bytes of a
    run, read them (``process_vm_readv`` of QEMU, else ``pread`` of
    ``/proc/PID/mem``; ``pread`` of a shared file) into a buffer of their own
    and ``pwrite`` the pages that are not all zeros, so reading and writing
    use both cores.  This thread reports progress and watches for a stop.
    Raises :class:`OSError` (ENOSPC...), :class:`QEMUGoneError`; returns
    early (the caller checks ``watch.stop``) when asked to stop.
    """
    from vmcorefs._readpath import Copier

    os.ftruncate(fd, p.size)
    os.pwrite(fd, p.prefix, 0)
    if watch.stop.is_set():
        return len(p.prefix)
    runs = [(r.offset, r.length, int(r.source.kind), r.source.base + r.delta, r.source.fd) for r in p.runs]
    copier = Copier(fd, runs, ram.memory.pid or 0, CHUNK)
    failure: list[OSError] = []

    def run() -> None:
        try:
            copier.run(COPY_THREADS)
        except OSError as e:
            failure.append(e)

    thread = threading.Thread(target=run, name="vmcorefs-dump-copy", daemon=True)
    thread.start()
    reported = 0
    while thread.is_alive():
        thread.join(PROGRESS_INTERVAL)
        done, _ = copier.progress()
        progress.update(done - reported)
        reported = done
        if watch.stop.is_set() or watch.qemu_exited():
            copier.cancel()
    thread.join()
    if failure:
        if failure[0].errno == errno.ESRCH or watch.qemu_exited():
            raise QEMUGoneError("QEMU exited during the dump")
        raise failure[0]
    watch.check()
    return len(p.prefix) + copier.progress()[1]


# -- kdump-compressed (zlib, lzo, snappy) -----------------------------------------


@dataclass(frozen=True)
class Codec:
    """How one ``--format kdump-*`` compresses a page: ``status`` (the
    header's and a compressed page descriptor's ``DUMP_DH_COMPRESSED_*``
    flag) and ``compress`` (one page in, its compressed bytes out, which
    the writer keeps only when shorter than a page: makedumpfile's and
    QEMU's rule)."""

    status: int
    compress: Callable[[bytes], bytes]


def codec(fmt: str) -> Codec:
    """The :class:`Codec` of kdump format ``fmt`` (zlib streams: ISA-L's
    level 1, and zlib's level 1 where ISA-L could shrink the page, the
    shorter of the two; LZO1X-1 through python-lzo; raw snappy through cramjam: what
    makedumpfile and QEMU write and crash, libkdumpfile and makedumpfile
    read).  Raises :class:`UsageError` when the binding is not installed."""
    from vmcorefs.core import kdump

    try:
        if fmt == "kdump-zlib":
            from isal import isal_zlib

            def deflate(page: bytes) -> bytes:
                # ISA-L first: 5-10x faster than zlib, and it tells the pages
                # nothing shrinks (random data, where zlib is slowest) at once;
                # the others are also given to zlib (level 1, QEMU's and
                # makedumpfile's), the shorter kept: never bigger than theirs.
                fast = isal_zlib.compress(page, 1)
                if len(fast) >= PAGE_SIZE:
                    return fast
                small = zlib.compress(page, 1)
                return small if len(small) < len(fast) else fast

            return Codec(kdump.DUMP_DH_COMPRESSED_ZLIB, deflate)
        if fmt == "kdump-lzo":
            import lzo  # python-lzo: liblzo2's lzo1x_1_compress

            return Codec(kdump.DUMP_DH_COMPRESSED_LZO, lambda page: bytes(lzo.compress(page, 1, False)))
        if fmt == "kdump-snappy":
            import cramjam

            return Codec(kdump.DUMP_DH_COMPRESSED_SNAPPY, lambda page: bytes(cramjam.snappy.compress_raw(page)))
    except ImportError as e:
        raise UsageError(f"--format {fmt}: {e.name} is not installed (pip install vmcorefs again)") from None
    raise UsageError(f"unknown kdump format {fmt!r}")


def _compress_pages(buf: bytes, compress: Callable[[bytes], bytes]) -> list[bytes | None]:
    """Each page of ``buf`` compressed (shorter than a page), or the page
    itself when compression does not shrink it, or None for an all-zero
    page (a worker thread: zlib, liblzo2 and snappy run without the GIL)."""
    out: list[bytes | None] = []
    for pos in range(0, len(buf), PAGE_SIZE):
        page = buf[pos:pos + PAGE_SIZE]
        if page == _ZERO_PAGE:
            out.append(None)
        else:
            c = compress(page)
            out.append(c if len(c) < PAGE_SIZE else page)
    return out


def _holes_only(fd: int, offset: int, length: int) -> bool:
    """True when ``[offset, offset + length)`` of ``fd`` is all file hole."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as e:
        return e.errno == errno.ENXIO  # no data after offset (else: cannot tell, read it)


def _guest_utsname(src: int, layout: SparseFile, snap: Snapshot) -> bytes:
    """The guest kernel's ``init_uts_ns.name`` read from the ELF in ``src``
    (what makedumpfile puts in the header), or one made of VMCOREINFO's
    ``OSRELEASE`` when it cannot be found."""
    from vmcorefs.core import kdump
    from vmcorefs.core.kcore import EM_386, EM_AARCH64, EM_X86_64

    # __pa_symbol as x86-64 computes it; other architectures map their kernel image differently.
    pa = kdump.utsname_paddr(snap.vmcoreinfo_fields) if snap.dump.e_machine == EM_X86_64 else None
    for seg in layout.segments:
        if pa is not None and seg.src <= pa and pa + kdump.UTSNAME_SIZE <= seg.src + seg.length:
            uts = os.pread(src, kdump.UTSNAME_SIZE, seg.offset + pa - seg.src)
            if kdump.uts_looks_sane(uts):
                return uts
    release = (snap.vmcoreinfo_fields or {}).get("OSRELEASE", "")
    machine = {EM_X86_64: "x86_64", EM_386: "i686", EM_AARCH64: "aarch64"}.get(snap.dump.e_machine, "unknown")
    return kdump.utsname("Linux", release, "#1 (unknown)", machine)


#: Chunks handed to the two compressing threads and not yet written: enough to
#: keep both busy while one is written (each holds a CHUNK and its output:
#: the writer's RSS stays under 80 MiB).
_KDUMP_IN_FLIGHT = 3


def write_kdump(src: int, out: int, layout: SparseFile, snap: Snapshot, fmt: str, watch: _Watch,
                progress: Progress) -> None:
    """Convert the sparse ELF in ``src`` (written by :func:`copy_runs` from
    ``layout``) into kdump-compressed ``fmt`` (``kdump-zlib|lzo|snappy``,
    see :func:`codec`) in ``out``: every page of every PT_LOAD, level 0,
    all-zero pages stored once (as QEMU's ``kdump-*``).  File holes are
    zero pages and are not read; pages are compressed by two worker
    threads, 4 MiB at a time, at most ``_KDUMP_IN_FLIGHT`` + 1 chunks in flight.
    Returns early when ``watch.stop`` is set.  Raises :class:`OSError`,
    :class:`UsageError` (no binding for ``fmt``)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from vmcorefs.core import kdump

    c = codec(fmt)
    ranges = [(seg.src, seg.length) for seg in layout.segments]
    kl = kdump.kdump_layout(snap.dump.notes, snap.vmcoreinfo_fields, ranges, c.status,
                            _guest_utsname(src, layout, snap), int(time.time()))
    PAGE_DESC = kdump.PAGE_DESC
    desc_offset, data_offset, npages_total = kl.desc_offset, kl.data_offset, kl.pages
    os.pwrite(out, kl.head, 0)
    del kl  # the header and its bitmaps (16 MiB for 256 GiB) are written: not kept during the copy
    zero = c.compress(_ZERO_PAGE)  # every all-zero page points at this one
    zero_desc = PAGE_DESC.pack(data_offset, len(zero), c.status, 0)
    os.pwrite(out, zero, data_offset)
    data_pos = data_offset + len(zero)
    index = 0
    pending: list[tuple[Future[list[bytes | None]] | None, int]] = []

    def drain(limit: int) -> None:
        nonlocal data_pos, index
        while len(pending) > limit:
            future, npages = pending.pop(0)
            if future is None:  # file holes: all zero pages
                os.pwrite(out, zero_desc * npages, desc_offset + index * PAGE_DESC.size)
                index += npages
                progress.update(npages * PAGE_SIZE)
                continue
            pages = future.result()
            descs = bytearray()
            data = bytearray()
            for page in pages:
                if page is None:
                    descs += zero_desc
                    continue
                flags = c.status if len(page) < PAGE_SIZE else 0
                descs += PAGE_DESC.pack(data_pos + len(data), len(page), flags, 0)
                data += page
            if data:
                os.pwrite(out, data, data_pos)
                data_pos += len(data)
            os.pwrite(out, descs, desc_offset + index * PAGE_DESC.size)
            index += len(pages)
            progress.update(npages * PAGE_SIZE)

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="vmcorefs-kdump") as pool:
        for seg in layout.segments:
            for pos in range(0, seg.length, CHUNK):
                if watch.stop.is_set():
                    return
                n = min(CHUNK, seg.length - pos)
                if _holes_only(src, seg.offset + pos, n):
                    pending.append((None, n // PAGE_SIZE))
                else:
                    pending.append((pool.submit(_compress_pages, os.pread(src, n, seg.offset + pos), c.compress),
                                    n // PAGE_SIZE))
                drain(_KDUMP_IN_FLIGHT)
        drain(0)
    if index != npages_total:
        raise DumpError(f"kdump: wrote {index} page descriptors, the header says {npages_total}")


# -- output file -------------------------------------------------------------------


def check_output(path: str, force: bool) -> str:
    """``path`` made absolute, after the checks done before touching the
    guest: not an existing file unless ``force`` (never a directory), its
    directory exists and is writable.  Raises :class:`UsageError`."""
    if not path:  # abspath('') would be the working directory
        raise UsageError("OUTPUT is empty (see 'vmcorefs dump --help')")
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory")
    if os.path.lexists(path):
        if not force:
            raise UsageError(f"{path}: already exists (--force to overwrite)")
        if not stat.S_ISREG(os.lstat(path).st_mode):
            # The output is renamed over OUTPUT: a device, FIFO, socket or
            # symbolic link there would be replaced, not written to.
            raise UsageError(f"{path}: not a regular file (--force replaces regular files only)")
    if not os.path.isdir(directory):
        raise UsageError(f"{directory}: " + ("not a directory" if os.path.exists(directory)
                                              else "directory does not exist"))
    try:
        st = os.statvfs(directory)
    except OSError as e:
        raise UsageError(f"{directory}: {e.strerror}") from None
    if st.f_flag & os.ST_RDONLY:
        raise UsageError(f"{directory}: read-only file system")
    if st.f_blocks == 0:
        raise UsageError(f"{directory}: a file system without storage (e.g. /proc) cannot hold the dump")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"{directory}: not writable")
    try:
        name_max = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(os.path.basename(path))) > name_max:
        raise UsageError(f"{path}: file name too long (at most {name_max} bytes here)")
    return path


def _link_noreplace(src: str, dst: str) -> None:
    """Give ``src`` the name ``dst`` unless ``dst`` exists (FileExistsError):
    a hard link then an unlink, atomic where the file system has hard links;
    elsewhere a check then a rename."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def check_space(directory: str, needed: int) -> None:
    """Raise :class:`UsageError` unless ``directory``'s file system has
    ``needed`` bytes free for us."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise UsageError(f"{directory}: not enough space: the dump needs up to {_size(needed)}"
                         f" (the guest's populated RAM), {_size(free)} free")


def allocated(path: str) -> int:
    """Bytes the file system allocated for ``path``."""
    return os.stat(path).st_blocks * 512


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


#: Characters of OUTPUT's name kept in a partial file's name (``.NAME.XXXXXXXX.vmcorefs-partial``
#: stays within NAME_MAX, 255, whatever OUTPUT's name).
PARTIAL_NAME_KEEP = 200


def _tempfile(directory: str, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f".{name[:PARTIAL_NAME_KEEP]}.", suffix=".vmcorefs-partial", dir=directory)
    os.close(fd)
    return path


# -- makedumpfile --------------------------------------------------------------------


@dataclass(frozen=True)
class Makedumpfile:
    """The makedumpfile a filtered or compressed dump runs: ``argv`` (the
    executable, its format option, ``-d LEVEL``) and ``version`` as printed
    by ``makedumpfile -v`` (``(1, 7, 2)``; ``()`` when it printed none)."""

    argv: list[str]
    version: tuple[int, ...]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version)) or "unknown version"


def makedumpfile_args(fmt: str, level: int) -> Makedumpfile:
    """makedumpfile for ``fmt`` and dump ``level`` (checked: it is
    installed, and built with the compression the format needs).
    Raises :class:`UsageError`."""
    exe = shutil.which("makedumpfile")
    if exe is None:
        raise UsageError(f"--format {fmt}" + (f" --filter {level}" if level else "")
                         + " needs makedumpfile (apt install makedumpfile)")
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"version (\d+(?:\.\d+)*)", out)
    version = tuple(int(n) for n in m.group(1).split(".")) if m else ()
    if fmt == "elf":
        return Makedumpfile([exe, "-E", "-d", str(level)], version)
    flag, feature = KDUMP[fmt]
    if feature is not None and not re.search(rf"^{feature}\s+enabled", out, re.M):
        mdf = Makedumpfile([exe], version)
        raise UsageError(f"--format {fmt} --filter {level}: this makedumpfile ({mdf.version_text}) was built"
                         f" without {feature}; use kdump-zlib with --filter, or {fmt} without it")
    return Makedumpfile([exe, flag, "-d", str(level)], version)


#: Dump level bit: makedumpfile's "user process data" (anonymous pages).
DL_EXCLUDE_USER_DATA = 8
#: The first makedumpfile that knows Linux 6.10's slab page type.
SLAB_PAGE_TYPE_MAKEDUMPFILE = (1, 7, 6)


def check_filter(mdf: Makedumpfile, level: int, vmcoreinfo: dict[str, str] | None) -> None:
    """Refuse a dump level this makedumpfile gets wrong for this kernel.

    Linux 6.10 made ``PG_slab`` a page type (VMCOREINFO: no
    ``NUMBER(PG_slab)``, a ``NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)`` instead).
    makedumpfile before 1.7.6 then no longer sees slab pages as slab, takes
    those whose ``page->mapping`` word has bit 0 set (SLUB's fields overlay
    it) for anonymous user pages, and ``-d 8`` drops them: kernel objects
    go missing from the dump (measured: 79 of 1009 slab pages on a 6.12
    guest with Debian 12's 1.7.2; crash then stops at start-up reading the
    pid xarray).  Raises :class:`UsageError` naming the level that is safe.
    ``vmcoreinfo``: the guest's VMCOREINFO fields (None: not known, no check).
    """
    if not level & DL_EXCLUDE_USER_DATA or not vmcoreinfo or not mdf.version:
        return
    if "NUMBER(PG_slab)" in vmcoreinfo or "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)" not in vmcoreinfo:
        return
    if mdf.version >= SLAB_PAGE_TYPE_MAKEDUMPFILE:
        return
    release = vmcoreinfo.get("OSRELEASE", "this kernel")
    raise UsageError(
        f"--filter {level}: makedumpfile {mdf.version_text} takes Linux {release}'s slab pages for user"
        f" pages (slab is a page type since Linux 6.10) and would drop kernel data; use --filter"
        f" {level & ~DL_EXCLUDE_USER_DATA} (user pages kept) or makedumpfile"
        f" {'.'.join(map(str, SLAB_PAGE_TYPE_MAKEDUMPFILE))} or later")


def run_makedumpfile(args: list[str], elf: str, output: str, watch: _Watch) -> None:
    """``makedumpfile ARGS ELF OUTPUT``; stopped at a signal.  Raises
    :class:`VmcorefsError` with makedumpfile's last error line."""
    # Its own session: a terminal's Ctrl-C reaches this process, which stops it.
    # Message level 6: common and error messages (not the progress lines).
    proc = subprocess.Popen([*args, "--message-level", "6", elf, output], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while True:
        try:
            out, _ = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if watch.stop.is_set():
                proc.kill()
                proc.wait()
                return
    if proc.returncode != 0 and not watch.stop.is_set():
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "makedumpfile Failed" not in ln
                    and not ln.startswith("The dumpfile is saved")), "")
        if proc.returncode < 0:
            how = f"killed by {signal.Signals(-proc.returncode).name}"
        else:
            how = f"exit {proc.returncode}"
        st = os.statvfs(os.path.dirname(output))
        if st.f_bavail * st.f_frsize < (1 << 20):
            why = f"{os.path.dirname(output)}: {os.strerror(errno.ENOSPC)}" + (f" ({why})" if why else "")
        raise DumpError(f"makedumpfile failed ({how}): {why or 'no message'}")


# -- the command ---------------------------------------------------------------------


@dataclass
class Result:
    """What the last line says: sizes in bytes, times in seconds; ``pause``
    is None when the guest was not paused by the dump."""

    output: str
    size: int
    allocated: int
    populated: int
    wall: float
    pause: float | None
    state: str

    def line(self) -> str:
        pause = (f"guest paused {self.pause:.3f} s" if self.pause is not None else
                 "guest not paused (--live)" if self.state == "live" else f"guest was {self.state}, left so")
        return (f"{self.output}: {_size(self.size)} ({self.size} bytes), {_size(self.allocated)} allocated,"
                f" {self.wall:.2f} s, {pause}")


def add_parser(sub: Any, seconds: Callable[[str], float] = float) -> argparse.ArgumentParser:
    """The ``dump`` subcommand on ``sub`` (cli's subparsers); ``seconds`` parses ``--timeout``."""
    d: argparse.ArgumentParser = sub.add_parser(
        "dump", help="write a point-in-time core file of the guest (sparse ELF or kdump-compressed)",
        description="Write OUTPUT: the guest's core at one paused instant (ELF as dump-guest-memory"
                    " paging=false, sparse; or kdump-compressed; --filter through makedumpfile).")
    d.add_argument("qmp_socket", metavar="QMP_SOCKET", nargs="?",
                   help="QEMU's QMP unix socket (-qmp unix:PATH,server=on); not with --domain")
    d.add_argument("output", metavar="OUTPUT")
    d.add_argument("--format", choices=FORMATS, default="elf",
                   help="elf (default, sparse), or kdump-zlib|kdump-lzo|kdump-snappy (kdump-compressed)")
    d.add_argument("--filter", type=_level, default=0, metavar="LEVEL",
                   help="makedumpfile's dump level (0-31, e.g. 31: drop zero, cache, user and free pages)")
    d.add_argument("--live", action="store_true",
                   help="copy without pausing the guest (a fuzzy image)")
    d.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")
    d.add_argument("--memory", choices=("auto", "shared", "procmem"), default="auto",
                   help="how to read guest RAM: shared backing file, /proc/PID/mem, or auto (default)")
    d.add_argument("--timeout", type=seconds, default=10.0, metavar="SECONDS",
                   help="how long a QMP command may take (default 10)")
    d.add_argument("--debug", action="store_true")
    return d


def _level(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_LEVEL:
        raise argparse.ArgumentTypeError(f"a dump level is 0-{MAX_LEVEL}: {text!r}")
    return int(text)


def _progress(quiet: bool, total: int, what: str) -> Progress:
    if quiet or not sys.stderr.isatty():
        return _NoProgress()
    from tqdm import tqdm  # type: ignore[import-untyped]

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        size = os.terminal_size((0, 0))
    # A terminal that reports no size (a pty nobody sized: 0 rows, 0 columns)
    # gets an 80-column bar; tqdm would draw none (0 rows), or a cut one.
    width: dict[str, Any] = {"dynamic_ncols": True} if size.columns and size.lines else {
        "ncols": size.columns or 80, "nrows": size.lines or 24}
    bar: Progress = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                         file=sys.stderr, leave=False, **width)
    return bar


OpenGuest = Callable[[argparse.Namespace], Any]


async def dump_command(args: argparse.Namespace, open_guest: OpenGuest) -> int:
    """``vmcorefs dump``: see the module docstring.  ``open_guest(args)``
    returns ``(monitor, guest)`` (cli's QMP socket / libvirt opener).
    Returns 0; raises :class:`UsageError` (exit 2) for bad input before the
    guest is touched or when space is short, :class:`DumpInterrupted`
    (130/143), other :class:`VmcorefsError` (1)."""
    from vmcorefs.live import LiveCore
    from vmcorefs.qemu.scan import GuestRAM
    from vmcorefs.watchdog import WatchedGuest, watch_freeze

    started = time.monotonic()
    output = check_output(args.output, args.force)
    directory = os.path.dirname(output)
    filtering = args.format != "elf" or args.filter != 0
    # kdump-* of every page is written here (two compressing threads, zero
    # pages once); filtering is makedumpfile's.
    native_kdump = args.format != "elf" and args.filter == 0
    if native_kdump:
        codec(args.format)  # its binding is there (else exit 2 before the guest is touched)
    mdf = makedumpfile_args(args.format, args.filter) if filtering and not native_kdump else None
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    copying = False
    monitor, guest = await open_guest(args)
    watch = _Watch(monitor.pid)

    ending = False

    def on_signal(signum: int) -> None:
        if not watch.signum and not ending:  # once the guest is resumed, only the monitor's close is left
            watch.signum = signum
            watch.stop.set()
            if not copying and task is not None:
                task.cancel()

    # Until the loop closes (no gap with the default action while the monitor
    # closes); a signal the command was started with ignored stays ignored.
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:
            loop.add_signal_handler(signum, on_signal, signum)
    partial: list[str] = []
    pause: float | None = None
    state = "live"
    watched: WatchedGuest | None = None

    def guest_now() -> str:
        """What became of the guest, for an error line."""
        if watched is not None and watched.ours:  # our cont was not answered
            return "guest still paused (the watchdog resumes it once QEMU answers)"
        return core_state(args.live, state)

    def partial_file() -> str:
        """A new hidden file in OUTPUT's directory, removed at the end (by
        the watchdog if this process is killed)."""
        path = _tempfile(directory, os.path.basename(output))
        partial.append(path)
        if watched is not None:
            watched.watchdog.remove_on_death(path)
        return path

    # RESUME events from the snapshot on: a resume by another client (or
    # the end of another dump's pause) mid-copy means the image mixes
    # instants.  (Through libvirt no QMP events arrive: not seen there.)
    events = contextlib.ExitStack()
    resumes = events.enter_context(monitor.listen("RESUME"))
    try:
        core = LiveCore(guest, directory, freeze=not args.live, cache=False)
        # A watchdog process resumes the guest if this process is killed with
        # it paused, and removes the partial files; quiet: when QEMU is gone
        # (nothing to resume) this process's error is the one line.
        watched = watch_freeze(core, monitor, quiet=True)
        state = await guest.status()  # --live: a paused guest gives an image of one instant all the same
        t_pause = time.monotonic()
        handle = await core.open("vmcore")
        resumes.clear()  # QEMU's answers to the snapshot came after any earlier event
        memory: ProcessMemory = guest.memory
        try:
            if mdf is not None:
                if not handle.snap.vmcoreinfo_fields:
                    raise UsageError("--filter: makedumpfile needs the guest's VMCOREINFO, and this guest has"
                                     " published none (no Linux kernel booted yet?); dump without --filter")
                check_filter(mdf, args.filter, handle.snap.vmcoreinfo_fields)
            with GuestRAM(memory, handle.snap.sources) as ram:
                p = plan(handle.snap, handle.layout, ram)
                # Worst case: nothing compresses (kdump keeps the ELF beside it meanwhile).
                need = (len(p.prefix) + p.populated) * (2 if filtering else 1) + (1 << 20)
                check_space(directory, need)
                if args.live and state == "running":  # after the checks: an error stays one line
                    print("vmcorefs: --live: the guest runs during the copy; the image is fuzzy"
                          " (memory of different instants)", file=sys.stderr)
                elf = partial_file()
                progress = _progress(args.quiet, p.populated, "copying" if not filtering else "copying (ELF)")
                copying = True
                try:
                    fd = os.open(elf, os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        await loop.run_in_executor(None, copy_runs, fd, p, ram, watch, progress)
                    finally:
                        os.close(fd)
                finally:
                    copying = False
                    progress.close()
            if not args.live and not resumes.empty():
                raise DumpError("the guest was resumed by another QMP client during the copy (the image would"
                                " mix instants; dump again, or use --live to accept that);"
                                f" {_cleanup(partial, 'guest left running')}")
        finally:
            paused_by_us = core.paused_by_us
            release = asyncio.ensure_future(core.release(handle))  # our resume, if the pause is ours
            try:
                await asyncio.shield(release)
            except asyncio.CancelledError:  # a signal during it: let it end, so the line says what it did
                await asyncio.wait({release}, timeout=args.timeout)
                if release.done() and not release.cancelled():
                    release.exception()  # retrieved: a failed resume is what guest_now() says (the watchdog's then)
                raise
            if paused_by_us:
                pause = time.monotonic() - t_pause
        if not watch.stop.is_set() and native_kdump:
            out_tmp = partial_file()
            progress = _progress(args.quiet, sum(s.length for s in handle.layout.segments), "compressing")
            copying = True
            try:
                src = os.open(elf, os.O_RDONLY | os.O_CLOEXEC)
                dst = os.open(out_tmp, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    await loop.run_in_executor(None, write_kdump, src, dst, handle.layout, handle.snap,
                                               args.format, watch, progress)
                finally:
                    os.close(src)
                    os.close(dst)
            finally:
                copying = False
                progress.close()
            os.unlink(elf)
            elf = out_tmp
        elif not watch.stop.is_set() and mdf is not None:
            out_tmp = partial_file()
            os.unlink(out_tmp)  # makedumpfile refuses to overwrite
            if not args.quiet and sys.stderr.isatty():
                print(f"vmcorefs: makedumpfile {' '.join(mdf.argv[1:])} ...", file=sys.stderr)
            copying = True
            await loop.run_in_executor(None, run_makedumpfile, mdf.argv, elf, out_tmp, watch)
            copying = False
            os.unlink(elf)
            elf = out_tmp
        if watch.stop.is_set():
            raise asyncio.CancelledError
        if args.force:
            os.rename(elf, output)
        else:
            try:
                _link_noreplace(elf, output)
            except FileExistsError:
                raise UsageError(f"{output}: already exists (it appeared during the dump; --force to overwrite);"
                                 f" {_cleanup(partial, core_state(args.live, state))}") from None
        partial.clear()
        ending = True  # OUTPUT is in place: a signal from now on changes nothing (exit 0)
    except (asyncio.CancelledError, KeyboardInterrupt):
        if watch.signum:
            raise DumpInterrupted(watch.signum, _cleanup(partial, guest_now())) from None
        raise
    except QEMUGoneError as e:
        raise QEMUGoneError(f"{e}; {_cleanup(partial, 'QEMU gone')}") from None
    except QMPError as e:  # a snapshot or the resume that QEMU did not answer
        raise DumpError(f"{e}; {_cleanup(partial, guest_now())}") from None
    except OSError as e:
        raise DumpError(f"{output}: {e.strerror}; {_cleanup(partial, guest_now())}") from None
    finally:
        for path in partial:
            with contextlib.suppress(OSError):
                os.unlink(path)
        ending = True
        if watched is not None:
            watched.watchdog.done()  # the partial files are gone (or renamed): nothing to remove
            watched.close()  # it resumes the guest only if our own resume failed
        watch.close()
        guest.close()
        events.close()
        await monitor.close()
    if not args.quiet:
        st = os.stat(output)
        result = Result(output, st.st_size, st.st_blocks * 512, p.populated, time.monotonic() - started,
                        pause, "live" if args.live else state)
        print(result.line(), file=sys.stderr)
    return 0


def core_state(live: bool, state: str) -> str:
    """What became of the guest, for an error line."""
    if live:
        return "the guest was not paused"
    return "guest resumed" if state == "running" else f"guest left {state}"


def _cleanup(partial: list[str], state: str) -> str:
    for path in partial:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return f"{state}, partial file removed" if partial else state
