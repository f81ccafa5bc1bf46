"""The native read path (vmcorefs._readpath) against the Python one.

Every other integration test already reads through the native path (it is
the default); these check that it is really the one answering, that it
splices shared RAM and copies /proc/PID/mem, and that it returns exactly the
bytes the Python path returns for awkward reads: unaligned, across the
prefix/segment and segment/zero boundaries, 1 MiB and larger, and past EOF.
"""

from __future__ import annotations

import ast
import mmap
import os
import random
import re
import time
from pathlib import Path

from elftools.elf.elffile import ELFFile

from vmcorefs import readpath
from vmcorefs.testing import GuestSpec, Mount, QemuGuest, require


def _stats(log: Path) -> dict[str, int]:
    """The engine's counters, logged by the daemon when it stops."""
    deadline = time.monotonic() + 30
    while not (lines := re.findall(r"native read path: (\{.*\})", log.read_text())):
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    return ast.literal_eval(lines[-1])  # type: ignore[no-any-return]


def _reads(path: Path, size: int, seed: int) -> list[tuple[int, int]]:
    """Offsets and lengths that cross every kind of boundary of ``path``."""
    loads = []
    if path.name in ("vmcore", "kcore"):
        with open(path, "rb") as f:
            loads = [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
    edges = [0, 64, 4096, size - 1, size]
    for s in loads[:6]:
        edges += [s["p_offset"], s["p_offset"] + s["p_filesz"]]
    rnd = random.Random(seed)
    out = []
    for e in edges:
        for delta in (-4097, -1, 0, 1, 333):
            for length in (1, 4095, 4096, 65536 + 7, 1 << 20, (1 << 20) + 4096 * 3 + 5):
                off = max(0, e + delta)
                out.append((off, length))
    for _ in range(60):
        out.append((rnd.randrange(size), rnd.choice([8, 512, 4096, 100_000, 1 << 20])))
    return out


def _read_all(path: Path, reads: list[tuple[int, int]]) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = []
        for off, length in reads:
            buf = mmap.mmap(-1, length)  # page-aligned, like most tools' buffers
            n = os.preadv(fd, [buf], off)
            out.append(bytes(buf[:n]))
            buf.close()
        return out
    finally:
        os.close(fd)


def test_native_path_is_built() -> None:
    require(readpath.available(), f"native read path not built: {readpath.IMPORT_ERROR}")


def test_native_equals_python(guest: QemuGuest, tmp_path: Path) -> None:
    """Same bytes from both read paths, cached and direct, on a paused guest."""
    require(readpath.available(), f"native read path not built: {readpath.IMPORT_ERROR}")
    g = guest
    log = tmp_path / "native.log"
    with g.paused():
        results: dict[tuple[str, str, str], list[bytes]] = {}
        for reads_opt in ("native", "python"):
            for io in ("cached", "direct"):
                opts = ["--reads", reads_opt, *(["--direct"] if io == "direct" else [])]
                if reads_opt == "native" and io == "direct":
                    opts += ["--debug", "--log-file", str(log)]
                with Mount(g, *opts) as m:
                    for name in ("vmcore", "pmem", "kcore", "vmcoreinfo"):
                        path = m.path / name
                        size = path.stat().st_size
                        results[(reads_opt, io, name)] = _read_all(path, _reads(path, size, seed=len(name)))
        for io in ("cached", "direct"):
            for name in ("vmcore", "pmem", "kcore", "vmcoreinfo"):
                ours, theirs = results[("native", io, name)], results[("python", io, name)]
                assert len(ours) == len(theirs)
                for i, (a, b) in enumerate(zip(ours, theirs)):
                    assert a == b, f"{io} {name}: read #{i} differs"
    stats = _stats(log)
    assert stats["reads"] > 1000, stats
    if g.spec.memory == "memfd":
        assert stats["spliced"] > stats["copied"], stats  # shared RAM is spliced
    else:
        assert stats["copied"] > 0, stats  # /proc/PID/mem is read and copied


def test_native_serves_tools(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    """A default mount answers reads natively (no Python per read)."""
    require(readpath.available(), f"native read path not built: {readpath.IMPORT_ERROR}")
    log = tmp_path / "d.log"
    with Mount(memfd_guest, "--debug", "--log-file", str(log)) as m:
        with open(m.vmcore, "rb") as f:
            load = ELFFile(f).get_segment(1)
            f.seek(load["p_offset"])
            assert len(f.read(1 << 20)) == 1 << 20
    text = log.read_text()
    assert "reads: native read path" in text
    stats = _stats(log)
    assert stats["reads"] > 0 and stats["handles"] == 0, stats
    # pyfuse3 saw no READ: every request it logged is something else.
    assert not re.search(r" DEBUG read\(", text)


def _vmpte_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmPTE:"))


def test_private_ram_read_without_touching_qemu(tmp_path: Path) -> None:
    """Private RAM QEMU never touched is answered from /proc/PID/pagemap as
    zeros: reading all of vmcore natively does not grow QEMU's page tables,
    while the Python path (pread of /proc/PID/mem) maps the zero page into
    QEMU for every such page it reads."""
    require(readpath.available(), f"native read path not built: {readpath.IMPORT_ERROR}")
    with QemuGuest(GuestSpec("pagemap", mib=1024, memory="private")) as g:
        with g.paused():
            grown = {}
            for reads in ("native", "python"):
                with Mount(g, "--direct", "--reads", reads) as m:
                    before = _vmpte_kb(g.pid)
                    with open(m.vmcore, "rb", buffering=0) as f:
                        while f.read(1 << 20):
                            pass
                    grown[reads] = _vmpte_kb(g.pid) - before
                    if reads == "native":
                        stats = m.stats()
                        assert stats["pagemap"] and stats["spliced"] > stats["copied"], stats
        assert grown["python"] >= 512, grown  # ~2 MiB per GiB of untouched RAM
        assert grown["native"] <= 64, grown
