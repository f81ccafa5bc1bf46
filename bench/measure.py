"""The measurements of the benchmark suite, one function each.

Each returns plain numbers (seconds, bytes, GB/s, microseconds); ``run.py``
repeats them, keeps the samples and turns them into tables.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import GiB, MiB, Guest, ScratchFile, dd, host_free, proc_status, shm_free

from vmcorefs.testing import SRC, VMCOREFS, Mount
#: The integration tests' drgn program: kallsyms from VMCOREINFO, no
#: debuginfo, then read linux_banner -- on a core file (DRGN_CORE), or
#: through drgn's own live QEMU mode (DRGN_QEMU; drgn >= 0.0.31:
#: Program.set_qemu_qmp, or `drgn --qemu SOCKET`), which finds QEMU's PID
#: with SO_PEERCRED and reads guest RAM straight from /proc/PID/mem at the
#: host addresses QMP tells it.
from vmcorefs.testing import DRGN_KALLSYMS as DRGN_CORE
from vmcorefs.testing import DRGN_KALLSYMS_QEMU as DRGN_QEMU

#: Host memory kept free whatever a measurement would like to use.
MARGIN = 3 * GiB


class Skip(Exception):
    """A measurement that cannot run here; the message says why."""


def drgn_banner(code: str, target: str | Path, release: str) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, target], capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - t
    if r.returncode != 0 or not r.stdout.startswith(f"Linux version {release} "):
        raise RuntimeError(f"drgn did not read linux_banner: rc={r.returncode} {r.stdout[:200]!r} "
                           f"{r.stderr.strip()[-500:]!r}")
    return elapsed


# -- (1) time to first answer -----------------------------------------------

def ttfa_vmcorefs(g: Guest, *options: str, key: str = "ttfa_vmcorefs") -> dict[str, float]:
    """(1a) + (5): `vmcorefs mount [options]`, then drgn on MNT/vmcore."""
    t = time.perf_counter()
    with Mount(g, *options) as m:
        t_mounted = time.perf_counter()
        drgn_banner(DRGN_CORE, m.vmcore, g.release)
        total = time.perf_counter() - t
    assert m.mount_s is not None
    return {f"{key}_s": total, "mount_s": m.mount_s, f"{key}_drgn_s": total - (t_mounted - t)}


def ttfa_vmcorefs_freeze(g: Guest) -> dict[str, float]:
    """(1a'): the same with `--freeze` (guest paused while vmcore is open: exact)."""
    out = ttfa_vmcorefs(g, "--freeze", key="ttfa_vmcorefs_freeze")
    del out["mount_s"]
    return out


def ttfa_qemu(g: Guest) -> dict[str, float]:
    """(1c): drgn --qemu (Program.set_qemu_qmp) on the guest's QMP socket."""
    return {"ttfa_qemu_s": drgn_banner(DRGN_QEMU, g.qmp_path, g.release)}


def dump_need(g: Guest) -> tuple[int, int]:
    """Host memory a paging=false dump of ``g`` takes: the file, plus (memfd
    guests) every page of the memfd QEMU has not touched yet -- QEMU reads
    guest RAM through its own mapping, and a read fault on a shared memfd
    hole allocates the page (measured: Shmem grows by the whole guest RAM)."""
    file_bytes = g.size_gib * GiB
    inflate = 0
    if g.kind == "memfd":
        inflate = max(0, g.size_gib * GiB - proc_status(g.pid).get("RssShmem", 0))
    return file_bytes, inflate


def qemu_resident(g: Guest) -> int:
    """Guest pages resident in QEMU: the memfd's (memfd) or anonymous (private)."""
    st = proc_status(g.pid)
    return st.get("RssShmem", 0) if g.kind == "memfd" else st["RssAnon"]


def before_qemu_dumps(g: Guest) -> int:
    """QEMU's resident guest pages before its first dump on ``g`` (kept on
    ``g``): the pages its dumps fault in stay, so every later dump's cost
    is counted from here."""
    if not hasattr(g, "resident_before_dumps"):
        g.resident_before_dumps = qemu_resident(g)  # type: ignore[attr-defined]
    return int(g.resident_before_dumps)  # type: ignore[attr-defined]


def ttfa_dump(g: Guest) -> dict[str, float]:
    """(1b): QEMU dump-guest-memory paging=false into /dev/shm, then drgn on the file."""
    file_bytes, inflate = dump_need(g)
    free = min(host_free(), shm_free() + inflate) - MARGIN
    if file_bytes + inflate > free:
        extra = f" (+ {inflate / GiB:.0f} GiB QEMU faults into the memfd)" if inflate > GiB // 2 else ""
        raise Skip(f"cannot run: needs {file_bytes / GiB:.0f} GiB of /dev/shm{extra}, "
                   f"{(free + MARGIN) / GiB:.1f} GiB free")
    resident0 = before_qemu_dumps(g)
    with ScratchFile("/dev/shm", "dump.elf") as f:
        t = time.perf_counter()
        g.qmp("dump-guest-memory", paging=False, protocol=f"file:{f.path}")
        t_dumped = time.perf_counter()
        drgn_banner(DRGN_CORE, f.path, g.release)
        total = time.perf_counter() - t
        size = os.stat(f.path).st_blocks * 512
    # Host memory held while the dump exists: the tmpfs file, plus the memfd
    # pages QEMU faulted in to write it (they stay: the guest now owns them).
    return {"ttfa_dump_s": total, "dump_s": t_dumped - t, "dump_file_bytes": size,
            "dump_host_bytes": size + qemu_resident(g) - resident0}


# -- (2) host memory, (3) sequential, (4) random ------------------------------

@dataclass
class Load:
    offset: int   # in vmcore
    paddr: int
    size: int
    backing: str  # memfd /proc/PID/fd/N, or /proc/PID/mem
    boff: int     # offset of paddr in backing


def ram_loads(g: Guest, vmcore: Path) -> list[Load]:
    """The vmcore PT_LOADs in guest RAM (>= 1 MiB), with where the same bytes
    are in the backing memfd or /proc/PID/mem."""
    with open(vmcore, "rb") as f:
        eh = f.read(64)
        phoff, = struct.unpack_from("<Q", eh, 32)
        phentsize, phnum = struct.unpack_from("<HH", eh, 54)
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
    out = []
    for i in range(phnum):
        p_type, _, p_offset, _, p_paddr, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", ph, i * phentsize)
        if p_type == 1 and p_filesz >= MiB:
            path, boff = g.backing_for(p_paddr)
            out.append(Load(p_offset, p_paddr, p_filesz, path, boff))
    return out


def random_reads(vmcore: Path, loads: list[Load], n: int, seed: int, mode: str = "") -> dict[str, float]:
    """(4): p50/p99 of 4 KiB preads at random pages of guest RAM, through
    vmcore and straight from the backing (same pages, same order).
    ``mode`` ("" for the default cached mount, "direct") tags vmcore's keys."""
    rng = random.Random(seed)
    weights = [ld.size for ld in loads]
    picks = []
    for ld in rng.choices(loads, weights, k=n):
        page = rng.randrange(ld.size // 4096) * 4096
        picks.append((ld.offset + page, ld.backing, ld.boff + page))
    out = {}
    fds = {p: os.open(p, os.O_RDONLY) for p in {ld.backing for ld in loads} | {vmcore}}
    try:
        for name, items in ((f"vmcore{mode}", [(fds[vmcore], o) for o, _, _ in picks]),
                            ("backing", [(fds[b], bo) for _, b, bo in picks])):
            lat = []
            for fd, off in items:
                t = time.perf_counter_ns()
                os.pread(fd, 4096, off)
                lat.append(time.perf_counter_ns() - t)
            lat.sort()
            out[f"rand_{name}_p50_us"] = lat[len(lat) // 2] / 1000
            out[f"rand_{name}_p99_us"] = lat[int(len(lat) * 0.99)] / 1000
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def sequential(vmcore: Path, loads: list[Load], prefix: int, mode: str = "vmcore") -> dict[str, float]:
    """(3): dd of the first ``prefix`` bytes of vmcore vs dd of the same
    amount of the backing (memfd, or /proc/PID/mem at the RAM's host
    address), block by block size.  ``mode`` tags vmcore's keys: "vmcore"
    for the default (cached) mount, "direct" for a ``--direct`` one."""
    first = min(loads, key=lambda ld: ld.paddr)
    # Host address of guest-physical 0: pc.ram is one host mapping.
    backing, bstart = first.backing, first.boff - first.paddr
    out = {}
    for bs, tag in ((128 << 10, "128k"), (1 << 20, "1m")):
        out[f"seq_{mode}_{tag}_gbps"] = prefix / dd(vmcore, bs, prefix) / 1e9
        out[f"seq_backing_{tag}_gbps"] = prefix / dd(backing, bs, prefix, bstart) / 1e9
    return out


def warm_backing(loads: list[Load], prefix: int) -> None:
    """Read the backing prefix once (private guests: /proc/PID/mem populates
    QEMU's page tables with the zero page on first touch)."""
    first = min(loads, key=lambda ld: ld.paddr)
    dd(first.backing, 1 << 20, prefix, first.boff - first.paddr)


def full_read(g: Guest, m: Mount, timebox: float) -> dict[str, float]:
    """(2): read vmcore once end to end in 1 MiB preads (stopping after
    ``timebox`` seconds), and what that cost the host:
    growth of the guest's memfd (memfd guests: its allocated blocks) or
    QEMU's RSS (private), QEMU page tables.  (The daemon's peak RSS is taken
    by ``run.py`` before it unmounts.)"""
    assert m.daemon_pid is not None
    memfd0 = g.memfd_bytes() if g.kind == "memfd" else 0
    q0 = proc_status(g.pid)
    buf = bytearray(1 << 20)
    fd = os.open(m.vmcore, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        done = 0
        t = time.perf_counter()
        deadline = t + timebox
        while done < size:
            n = os.preadv(fd, [buf], done)
            if n <= 0:
                break
            done += n
            if (done & ((256 << 20) - 1)) == 0 and time.perf_counter() > deadline:
                break
        elapsed = time.perf_counter() - t
    finally:
        os.close(fd)
    q1 = proc_status(g.pid)
    qemu_growth = (q1["RssAnon"] + q1.get("RssShmem", 0)) - (q0["RssAnon"] + q0.get("RssShmem", 0))
    growth = g.memfd_bytes() - memfd0 if g.kind == "memfd" else qemu_growth
    return {
        "fullread_bytes": done, "fullread_fraction": done / size, "fullread_s": elapsed,
        "fullread_gbps": done / elapsed / 1e9,
        "fullread_growth_bytes": growth, "fullread_qemu_rss_growth_bytes": qemu_growth,
        "fullread_qemu_pte_growth_bytes": q1.get("VmPTE", 0) - q0.get("VmPTE", 0),
    }


# -- (5) freeze ---------------------------------------------------------------

def freeze_pause(g: Guest, m: Mount) -> dict[str, float]:
    """(5): with --freeze, the guest pause one open()+close() of vmcore adds:
    from QEMU's STOP event to its RESUME event (QEMU's own timestamps)."""
    g.clear_events()
    t = time.perf_counter()
    fd = os.open(m.vmcore, os.O_RDONLY)
    os.close(fd)
    openclose = time.perf_counter() - t
    return {"freeze_pause_ms": stop_to_resume(g) * 1000, "freeze_openclose_ms": openclose * 1000}


def stop_to_resume(g: Guest) -> float:
    """Seconds from the first STOP event since ``g.clear_events()`` to the
    RESUME after it (QEMU's own timestamps)."""
    stop = resume = None
    deadline = time.monotonic() + 10
    while resume is None and time.monotonic() < deadline:
        for ev in g.events(wait=0.5):
            ts = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
            if ev["event"] == "STOP" and stop is None:
                stop = ts
            elif ev["event"] == "RESUME" and stop is not None:
                resume = ts
    if stop is None or resume is None:
        raise RuntimeError(f"no STOP/RESUME pair seen (status {g.status()})")
    return resume - stop


# -- (6) filtered dump ----------------------------------------------------------

def served_bytes(m: Mount) -> int:
    """Bytes of file data vmcorefs has served on ``m`` (its read path's
    counter, in the root's ``user.vmcorefs.stats``)."""
    return int(m.stats()["bytes"])


def makedumpfile(m: Mount, outdir: str, timeout: float) -> dict[str, float]:
    """(6): makedumpfile -c -d 31 of the live vmcore; bytes vmcorefs served
    it (the read path's counter: what was read from the guest, readahead
    included)."""
    assert m.daemon_pid is not None
    with ScratchFile(outdir, "mdf.kdump") as out:
        served0 = served_bytes(m)
        t = time.perf_counter()
        try:
            r = subprocess.run(["makedumpfile", "-c", "-d", "31", m.vmcore, out.path],
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Skip(f"makedumpfile did not finish in {timeout:.0f} s") from None
        elapsed = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"makedumpfile failed ({r.returncode}): {(r.stdout + r.stderr)[-500:]}")
        return {"mdf_s": elapsed, "mdf_read_bytes": served_bytes(m) - served0,
                "mdf_out_bytes": os.path.getsize(out.path)}


def qemu_kdump(g: Guest, outdir: str) -> dict[str, float]:
    """(6) anchor: QEMU's dump-guest-memory format=kdump-zlib (no page-type
    filter; QEMU reads every guest page and stores zero pages once)."""
    _, inflate = dump_need(g)
    if inflate > host_free() - MARGIN:
        raise Skip(f"cannot run: QEMU would fault {inflate / GiB:.0f} GiB into the memfd, "
                   f"{host_free() / GiB:.1f} GiB free")
    resident0 = before_qemu_dumps(g)
    with ScratchFile(outdir, "qemu.kdump") as out:
        t = time.perf_counter()
        g.qmp("dump-guest-memory", paging=False, protocol=f"file:{out.path}", format="kdump-zlib")
        elapsed = time.perf_counter() - t
        size = os.path.getsize(out.path)
    return {"qkdump_s": elapsed, "qkdump_out_bytes": size, "qkdump_read_bytes": g.size_gib * GiB,
            "qkdump_growth_bytes": qemu_resident(g) - resident0}


# -- (7) vmcorefs dump ------------------------------------------------------------

def vmcorefs_dump(g: Guest, outdir: str, fmt: str = "elf", key: str = "") -> dict[str, float]:
    """(7): ``vmcorefs dump --format FMT`` of the running guest into
    ``outdir``: wall time, guest pause (QEMU's STOP to RESUME), output and
    allocated size, the command's peak RSS (``wait4``), the guest RAM the
    host held before (QEMU's resident guest pages: what "populated" means
    for the allocated size) and the guest pages the dump made the host hold
    (the same, after minus before).  Key prefix ``key``, by default
    ``vdump`` (elf) or ``vkdump`` (kdump-*)."""
    key = key or ("vdump" if fmt == "elf" else "vkdump")
    resident0 = qemu_resident(g)
    with ScratchFile(outdir, f"{key}.{fmt}") as out:
        g.clear_events()
        env = dict(os.environ, PYTHONPATH=str(SRC))
        t = time.perf_counter()
        proc = subprocess.Popen([*VMCOREFS, "dump", "--quiet", "--format", fmt, g.qmp_path, out.path],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.returncode == 2 and "not enough space" in err:
            raise Skip(err.strip())
        if proc.returncode != 0:
            raise RuntimeError(f"vmcorefs dump failed ({proc.returncode}): {err[-500:]}")
        st = os.stat(out.path)
    return {f"{key}_s": elapsed, f"{key}_pause_s": stop_to_resume(g), f"{key}_size_bytes": st.st_size,
            f"{key}_alloc_bytes": st.st_blocks * 512, f"{key}_rss_bytes": usage.ru_maxrss * 1024,
            f"{key}_populated_bytes": resident0, f"{key}_growth_bytes": qemu_resident(g) - resident0}


def qemu_elf(g: Guest, outdir: str, key: str) -> dict[str, float]:
    """(7) anchor: QEMU's ``dump-guest-memory paging=false`` (ELF) into a
    file in ``outdir`` (``/dev/null``: into nothing, a lower bound of its
    time), without drgn after it: wall time (= the guest's pause: QEMU stops
    it for the whole dump), allocated size, and the guest pages the dump
    faulted into host memory.  Skipped when the file (every page of guest
    RAM) does not fit in ``outdir`` or QEMU would fault more never-touched
    pages into a memfd than the host has."""
    file_bytes, inflate = dump_need(g)
    if inflate > host_free() - MARGIN:
        raise Skip(f"cannot run: QEMU's dump would fault {inflate / GiB:.0f} GiB of never-touched guest RAM"
                   f" into the memfd, {host_free() / GiB:.1f} GiB of host memory free")
    resident0 = before_qemu_dumps(g)
    if outdir == "/dev/null":
        t = time.perf_counter()
        g.qmp("dump-guest-memory", paging=False, protocol="file:/dev/null")
        return {f"{key}_s": time.perf_counter() - t, f"{key}_growth_bytes": qemu_resident(g) - resident0}
    st = os.statvfs(outdir)
    free = st.f_bavail * st.f_frsize
    if os.path.realpath(outdir).startswith("/dev/shm"):
        free = min(free, host_free() - inflate - MARGIN)  # tmpfs pages are host memory
    if file_bytes + GiB > free:
        raise Skip(f"cannot run: QEMU's ELF is {file_bytes / GiB:.0f} GiB (every page written),"
                   f" {free / GiB:.1f} GiB free in {outdir}")
    with ScratchFile(outdir, f"{key}.elf") as f:
        t = time.perf_counter()
        g.qmp("dump-guest-memory", paging=False, protocol=f"file:{f.path}")
        elapsed = time.perf_counter() - t
        alloc = os.stat(f.path).st_blocks * 512
    return {f"{key}_s": elapsed, f"{key}_alloc_bytes": alloc, f"{key}_growth_bytes": qemu_resident(g) - resident0}


def vmcorefs_filtered(g: Guest, outdir: str, level: int = 31) -> dict[str, float]:
    """(7) ``vmcorefs dump --format kdump-zlib --filter LEVEL`` into
    ``outdir``: wall time and output size."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    with ScratchFile(outdir, "vfilter.kdump") as out:
        t = time.perf_counter()
        r = subprocess.run([*VMCOREFS, "dump", "--quiet", "--format", "kdump-zlib", "--filter", str(level),
                            g.qmp_path, out.path], env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"vmcorefs dump --filter {level} failed ({r.returncode}): {r.stderr[-500:]}")
        return {"vfilter_s": elapsed, "vfilter_out_bytes": os.path.getsize(out.path)}


def qemu_filtered(g: Guest, outdir: str, level: int = 31) -> dict[str, float]:
    """(7) anchor of :func:`vmcorefs_filtered`, what one does without
    vmcorefs: QEMU's ELF dump into ``outdir``, then ``makedumpfile -c -d
    LEVEL`` of it: wall time (both) and output size.  Skipped when QEMU's
    ELF does not fit, QEMU would fault more never-touched memfd pages in
    than the host has.  makedumpfile cannot read QEMU's file as QEMU
    writes it: :func:`phdrs_to_64` rewrites its header first (the one step
    a user would add; its time is counted)."""
    file_bytes, inflate = dump_need(g)
    if inflate > host_free() - MARGIN:
        raise Skip(f"cannot run: QEMU's dump would fault {inflate / GiB:.0f} GiB of never-touched guest RAM"
                   f" into the memfd, {host_free() / GiB:.1f} GiB of host memory free")
    st = os.statvfs(outdir)
    if file_bytes + GiB > st.f_bavail * st.f_frsize:
        raise Skip(f"cannot run: QEMU's ELF is {file_bytes / GiB:.0f} GiB (every page written),"
                   f" {st.f_bavail * st.f_frsize / GiB:.1f} GiB free in {outdir}")
    before_qemu_dumps(g)
    with ScratchFile(outdir, "qfilter.elf") as elf, ScratchFile(outdir, "qfilter.kdump") as out:
        t = time.perf_counter()
        g.qmp("dump-guest-memory", paging=False, protocol=f"file:{elf.path}")
        dumped = time.perf_counter() - t
        moved = phdrs_to_64(elf.path)
        r = subprocess.run(["makedumpfile", "-c", "-d", str(level), elf.path, out.path], capture_output=True,
                           text=True)
        elapsed = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"makedumpfile failed ({r.returncode}) on QEMU's ELF"
                               f"{' (program headers moved from offset %d to 64)' % moved if moved else ''}: "
                               f"{(r.stdout + r.stderr)[-500:]}")
        return {"qfilter_s": elapsed, "qfilter_dump_s": dumped, "qfilter_out_bytes": os.path.getsize(out.path)}


def phdrs_to_64(path: str) -> int:
    """Rewrite the ELF64 header of QEMU's dump at ``path`` in place so that
    makedumpfile reads it: makedumpfile (1.7.2, 1.7.6) reads the program
    header table right after the 64-byte ELF header, where QEMU (7.2 and
    later) puts its section headers ("Can't get the number of PT_LOAD").
    The table is copied to offset 64, ``e_phoff`` set to 64, ``e_ehsize``
    to 64 and the section header fields (``e_shoff``, ``e_shentsize``,
    ``e_shnum``, ``e_shstrndx``) to 0; no segment byte moves.  Returns the
    old ``e_phoff``, or 0 when it was already 64.  Raises RuntimeError if a
    segment starts before the end of the moved table."""
    with open(path, "r+b") as f:
        ehdr = bytearray(f.read(64))
        phoff, = struct.unpack_from("<Q", ehdr, 32)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
        if phoff == 64:
            return 0
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        first = min(struct.unpack_from("<Q", table, i * phentsize + 8)[0] for i in range(phnum))
        if first < 64 + len(table):
            raise RuntimeError(f"{path}: a segment starts at {first}, inside the program headers moved to 64")
        struct.pack_into("<QQ", ehdr, 32, 64, 0)       # e_phoff, e_shoff
        struct.pack_into("<H", ehdr, 52, 64)           # e_ehsize
        struct.pack_into("<HHH", ehdr, 58, 0, 0, 0)    # e_shentsize, e_shnum, e_shstrndx
        f.seek(0)
        f.write(bytes(ehdr) + table)
    return phoff


def guest_fill(g: Guest, mib: int) -> dict[str, float]:
    """Have the guest write ``mib`` MiB of /dev/urandom into a tmpfs of its
    own (guest RAM really in use, incompressible), typed on its console;
    seconds it took."""
    return {"fill_s": g.fill(mib)}


# -- (8) VMCOREINFO from guest RAM ------------------------------------------------

#: Opens of vmcore after the first, for the steady-state open time.
FINDER_LATER_OPENS = 5


def _open_close(path: Path) -> float:
    t = time.perf_counter()
    with open(path, "rb") as f:
        f.read(64)
    return time.perf_counter() - t


def finder_open(g: Guest, tag: str) -> dict[str, float]:
    """(8) `vmcorefs mount`, then the first open+close of ``MNT/vmcore``
    (64 bytes read), then :data:`FINDER_LATER_OPENS` more (their median).
    ``tag``: ``dev`` (a guest with -device vmcoreinfo) or ``nodev`` (without:
    the mount's first snapshot scans guest RAM for VMCOREINFO; later opens
    re-validate what it found).  Each call is a new daemon, so a new scan."""
    with Mount(g) as m:
        first = _open_close(m.vmcore)
        later = sorted(_open_close(m.vmcore) for _ in range(FINDER_LATER_OPENS))
        if not (m.path / "vmcoreinfo").exists():
            raise RuntimeError(f"no vmcoreinfo file on the mount of {g.spec.name}")
    assert m.mount_s is not None
    return {f"finder_mount_{tag}_s": m.mount_s, f"finder_open1_{tag}_ms": first * 1e3,
            f"finder_open_{tag}_ms": later[len(later) // 2] * 1e3,
            f"finder_first_{tag}_s": m.mount_s + first}
