"""``vmcorefs dump``: byte-identity with QEMU's own dump, sparseness, the
tools that read the file, the kdump formats, and every failure case leaving
the guest as it was and no partial file."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from elftools.elf.elffile import ELFFile

from vmcorefs.testing import (
    BACKPORTS,
    CRASH9,
    DEBIAN11,
    DEBIAN12,
    GuestSpec,
    QemuGuest,
    require,
    run_vmcorefs,
    spawn_vmcorefs,
    wait_for,
)
from vmcorefs.testing.tools import drgn_tasks, run_crash

pytestmark = pytest.mark.integration
CHUNK = 4 << 20
SUMMARY = re.compile(r": [\d.]+ \w+ \((\d+) bytes\), [\d.]+ \w+ allocated, [\d.]+ s, (.*)$")


def _dump(guest: QemuGuest, out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_vmcorefs("dump", guest.qmp_path, str(out), *args, timeout=timeout)


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmcorefs: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def _no_partial(directory: Path) -> None:
    assert [p.name for p in directory.iterdir() if "vmcorefs-partial" in p.name] == []


def _segments(elf: ELFFile) -> list[tuple[str, int, int, int, int, int]]:
    """(type, p_paddr, p_vaddr, p_memsz, p_offset, p_filesz) of every program header."""
    return [(s["p_type"], s["p_paddr"], s["p_vaddr"], s["p_memsz"], s["p_offset"], s["p_filesz"])
            for s in elf.iter_segments()]


def assert_same_core(ours: Path, theirs: Path) -> None:
    """``ours`` has QEMU's dump's program headers (but file offsets), its
    notes, and every PT_LOAD byte; headers at offset 64; sparse."""
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        ea, eb = ELFFile(a), ELFFile(b)
        assert ea["e_phoff"] == 64 and ea["e_type"] == "ET_CORE" and ea.elfclass == 64
        assert ea["e_machine"] == eb["e_machine"]
        sa, sb = _segments(ea), _segments(eb)
        assert [s[:4] for s in sa] == [s[:4] for s in sb]
        assert sa[0][0] == "PT_NOTE" and all(s[0] == "PT_LOAD" for s in sa[1:])
        for (kind, paddr, _, _, off_a, size), (_, _, _, _, off_b, size_b) in zip(sa, sb):
            assert size == size_b
            assert kind == "PT_NOTE" or off_a % 4096 == 0
            for done in range(0, size, CHUNK):
                n = min(CHUNK, size - done)
                a.seek(off_a + done)
                b.seek(off_b + done)
                assert a.read(n) == b.read(n), f"{kind} differs at paddr {paddr + done:#x}"
        assert os.fstat(a.fileno()).st_size == sa[-1][4] + sa[-1][5]


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def populated_bytes(guest: QemuGuest) -> int:
    """Bytes of guest RAM the host holds for QEMU (Rss of its RAM mappings)
    as an upper bound of what a sparse dump may allocate."""
    total = 0
    with open(f"/proc/{guest.pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                total = int(line.split()[1]) * 1024
    return total


def test_paused_dump_equals_qemu_dump_and_stays_paused(guest: QemuGuest, tmp_path: Path) -> None:
    """A guest paused by the caller: the dump leaves it paused, equals
    QEMU's dump-guest-memory of the same instant, and is sparse."""
    ours, oracle = tmp_path / "ours.elf", tmp_path / "qemu.elf"
    with guest.paused():
        r = _dump(guest, ours)
        assert r.returncode == 0, r.stderr
        assert guest.status() == "paused"
        guest.dump(oracle)
    m = SUMMARY.search(r.stderr)
    assert m and m[2] == "guest was paused, left so", r.stderr
    assert int(m[1]) == os.path.getsize(ours)
    assert_same_core(ours, oracle)
    assert allocated(ours) < os.path.getsize(ours) // 2
    assert allocated(ours) <= populated_bytes(guest) + (1 << 20)
    _no_partial(tmp_path)


def test_running_guest_paused_then_resumed_tools_open_it(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    """A running guest is paused for the copy and resumed after (pause time
    printed); drgn with debuginfo, makedumpfile and crash open the file."""
    out = tmp_path / "vm.elf"
    memfd_guest.clear_events()
    r = _dump(memfd_guest, out)
    assert r.returncode == 0, r.stderr
    assert memfd_guest.status() == "running"
    names = [e["event"] for e in memfd_guest.events()]
    assert "STOP" in names and "RESUME" in names
    m = SUMMARY.search(r.stderr)
    assert m and re.fullmatch(r"guest paused [\d.]+ s", m[2]), r.stderr
    require(DEBIAN12.vmlinux.exists(), "no debug vmlinux (scripts/build-guest.sh --dbg)")
    tasks = drgn_tasks(out, DEBIAN12.vmlinux)
    assert tasks.release == memfd_guest.release and tasks.tasks > 10
    require(shutil.which("makedumpfile") is not None, "makedumpfile not installed")
    mk = subprocess.run(["makedumpfile", "-c", "-d", "31", str(out), str(tmp_path / "vm.kdump")],
                        capture_output=True, text=True, timeout=300)
    assert mk.returncode == 0, mk.stdout + mk.stderr
    text = run_crash(DEBIAN12.vmlinux, out, "sys")
    assert re.search(rf"RELEASE: {re.escape(memfd_guest.release)}", text), text


def test_dump_numa_above_4g(tmp_path: Path) -> None:
    """RAM split around the 4 GiB hole over two NUMA backends (memfd and
    private): equal to QEMU's dump of the same paused instant."""
    spec = GuestSpec("numa", mib=3584, memory="none",
                     extra=("-m", "3584M",
                            "-object", "memory-backend-memfd,id=m0,size=2G,share=on",
                            "-object", "memory-backend-ram,id=m1,size=1536M",
                            "-numa", "node,memdev=m0", "-numa", "node,memdev=m1"))
    ours = tmp_path / "ours.elf"
    oracle = Path("/dev/shm") / f"vmcorefs-test-{os.getpid()}.dump"
    with QemuGuest(spec) as g:
        try:
            with g.paused():
                r = _dump(g, ours)
                assert r.returncode == 0, r.stderr
                g.dump(oracle)
            with open(ours, "rb") as f:
                assert any(s[1] >= 1 << 32 for s in _segments(ELFFile(f))), "no RAM above 4 GiB"
            assert_same_core(ours, oracle)
            assert allocated(ours) < os.path.getsize(ours) // 4
        finally:
            oracle.unlink(missing_ok=True)


DRGN_PAGES = r"""
import sys, drgn
a, b = drgn.Program(), drgn.Program()
a.set_core_dump(sys.argv[1]); b.set_core_dump(sys.argv[2])
bad = 0
for start, size in [(int(x, 0), int(y, 0)) for x, y in (r.split(":") for r in sys.argv[3:])]:
    try:
        a.read(start, 1, True)
    except drgn.FaultError as e:
        print("outside", hex(start), e)
        continue
    for addr in range(start, start + size, 1 << 20):
        n = min(1 << 20, start + size - addr)
        if a.read(addr, n, True) != b.read(addr, n, True):
            bad += 1
            print("differs", hex(addr))
print("compared", bad)
"""


#: The header's ``status`` (and compressed pages' flags) per format: makedumpfile's DUMP_DH_COMPRESSED_*.
KDUMP_STATUS = {"kdump-zlib": 1, "kdump-lzo": 2, "kdump-snappy": 4}


@pytest.mark.parametrize("fmt", ["kdump-zlib", "kdump-lzo", "kdump-snappy"])
def test_kdump_formats_pages_equal_guest(memfd_guest: QemuGuest, tmp_path: Path, fmt: str) -> None:
    """kdump-compressed output (written by vmcorefs, no filtering): drgn
    (libkdumpfile) reads the same physical pages as in QEMU's ELF dump of
    the same paused instant; crash 9 opens it."""
    out, oracle = tmp_path / f"vm.{fmt}", tmp_path / "qemu.elf"
    with memfd_guest.paused():
        r = _dump(memfd_guest, out, "--format", fmt)
        assert r.returncode == 0, r.stderr
        memfd_guest.dump(oracle)
    with open(out, "rb") as f:
        head = f.read(4096)
    assert head[:8] == b"KDUMP   "
    assert int.from_bytes(head[424:428], "little") == KDUMP_STATUS[fmt]
    with open(oracle, "rb") as f:
        ranges = [f"{s[1]:#x}:{s[3]:#x}" for s in _segments(ELFFile(f)) if s[0] == "PT_LOAD"]
    p = subprocess.run([sys.executable, "-c", DRGN_PAGES, str(out), str(oracle), *ranges],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("compared 0"), p.stdout[-2000:]
    # kdump files cover PFNs up to the last RAM page: the BIOS ROM below 4 GiB is not in them.
    outside = [int(x, 16) for x in re.findall(r"^outside (0x[0-9a-f]+)", p.stdout, re.M)]
    assert all(0xfff00000 <= x < 1 << 32 for x in outside), p.stdout
    _no_partial(tmp_path)
    require(DEBIAN12.vmlinux.exists(), "no debug vmlinux (scripts/build-guest.sh --dbg)")
    require(CRASH9.exists(), f"crash 9 missing ({CRASH9}); run scripts/build-tools.sh crash")
    text = run_crash(DEBIAN12.vmlinux, out, "sys", crash=CRASH9)
    assert re.search(rf"RELEASE: {re.escape(memfd_guest.release)}", text), text


def test_kdump_snappy_filter_needs_makedumpfile_with_snappy(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    """kdump-snappy --filter (makedumpfile -p) works when makedumpfile has
    snappy; otherwise one line, exit 2, before the guest is touched (without
    --filter vmcorefs writes kdump-snappy itself: the test above)."""
    require(shutil.which("makedumpfile") is not None, "makedumpfile not installed")
    has = re.search(r"^snappy\s+enabled", subprocess.run(["makedumpfile", "-v"], capture_output=True,
                                                         text=True).stdout, re.M)
    out = tmp_path / "vm.kdump"
    memfd_guest.clear_events()
    r = _dump(memfd_guest, out, "--format", "kdump-snappy", "--filter", "1")
    if has:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 2 and "built without snappy" in _one_line(r)
        assert not out.exists()
        assert [e for e in memfd_guest.events() if e["event"] == "STOP"] == []
    _no_partial(tmp_path)


def test_filter_31(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    """--filter 31 (zero, cache, user and free pages dropped by makedumpfile):
    an ELF that drgn opens, much smaller than the unfiltered one."""
    out, full = tmp_path / "f31.elf", tmp_path / "full.elf"
    assert _dump(memfd_guest, full).returncode == 0
    r = _dump(memfd_guest, out, "--filter", "31")
    assert r.returncode == 0, r.stderr
    assert allocated(out) < allocated(full)
    require(DEBIAN12.vmlinux.exists(), "no debug vmlinux (scripts/build-guest.sh --dbg)")
    assert drgn_tasks(out, DEBIAN12.vmlinux).release == memfd_guest.release


def test_filter_user_pages_on_610_kernels(qemu10_memfd_guest: QemuGuest, tmp_path: Path) -> None:
    """Linux 6.12 (slab a page type): Debian 12's makedumpfile 1.7.2 with
    ``-d 8`` in the level drops slab pages, so --filter 31 is refused in one
    line naming --filter 23, the guest resumed and no file left; --filter 23
    gives a kdump file that crash 9 opens and lists the tasks of."""
    g = qemu10_memfd_guest
    version = subprocess.run(["makedumpfile", "-v"], capture_output=True, text=True).stdout
    require("version 1.7." in version, f"not Debian 12's makedumpfile: {version[:60]!r}")
    out = tmp_path / "f.kdump"
    r = _dump(g, out, "--format", "kdump-zlib", "--filter", "31")
    line = _one_line(r)
    assert r.returncode == 2 and "use --filter 23 " in line and g.release in line, r.stderr
    assert g.status() == "running" and not out.exists()
    _no_partial(tmp_path)
    r = _dump(g, out, "--format", "kdump-zlib", "--filter", "23")
    assert r.returncode == 0, r.stderr
    require(CRASH9.exists(), f"crash 9 missing ({CRASH9}); run scripts/build-tools.sh crash")
    text = run_crash(BACKPORTS.vmlinux, out, "sys\nps", crash=CRASH9)
    assert f"RELEASE: {g.release}" in text and re.search(r"^[ >]\s*1\s+0\s", text, re.M), text


def test_live_dump_of_busy_guest_says_fuzzy(tmp_path: Path) -> None:
    """--live never pauses a guest that is busy (a shell loop on a vCPU and
    kernel messages); the file is complete and says so on stderr."""
    with QemuGuest(GuestSpec("busy", console=True)) as g:
        g.send_console(b"while :; do echo $((i=i+1)) > /dev/null; done &\n")
        time.sleep(1)
        g.clear_events()
        out = tmp_path / "live.elf"
        r = _dump(g, out, "--live")
        assert r.returncode == 0, r.stderr
        assert "fuzzy" in r.stderr and "guest not paused (--live)" in r.stderr
        # At most one STOP: QEMU's own 1-byte dump for the notes (milliseconds).
        assert [e["event"] for e in g.events() if e["event"] == "STOP"] in ([], ["STOP"])
        assert g.status() == "running"
        with open(out, "rb") as f:
            loads = [s for s in _segments(ELFFile(f)) if s[0] == "PT_LOAD"]
        assert sum(s[3] for s in loads) >= g.mem_mb << 20
        assert allocated(out) < os.path.getsize(out) // 2
        # Of a guest paused meanwhile, --live says nothing of fuzziness (one instant all the same).
        with g.paused():
            r = _dump(g, tmp_path / "paused.elf", "--live")
        assert r.returncode == 0 and "fuzzy" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


# -- bad input: one line, exit 2, guest untouched, no file ---------------------------


def _untouched(guest: QemuGuest, r: subprocess.CompletedProcess[str], directory: Path) -> str:
    line = _one_line(r)
    assert r.returncode == 2, r.stderr
    assert guest.status() == "running"
    assert [e for e in guest.events() if e["event"] == "STOP"] == []
    _no_partial(directory)
    return line


def test_output_exists_refused_unless_force(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    out = tmp_path / "vm.elf"
    out.write_text("keep me")
    memfd_guest.clear_events()
    assert "already exists" in _untouched(memfd_guest, _dump(memfd_guest, out), tmp_path)
    assert out.read_text() == "keep me"
    r = _dump(memfd_guest, out, "--force")
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        assert f.read(4) == b"\x7fELF"


def test_bad_outputs_and_format(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    memfd_guest.clear_events()
    assert "does not exist" in _untouched(memfd_guest, _dump(memfd_guest, tmp_path / "no" / "vm.elf"), tmp_path)
    (tmp_path / "file").write_text("")
    assert "file: not a directory" in _untouched(memfd_guest, _dump(memfd_guest, tmp_path / "file" / "vm.elf"),
                                                tmp_path)
    (tmp_path / "file").unlink()
    assert "invalid choice" in _untouched(memfd_guest, _dump(memfd_guest, tmp_path / "x", "--format", "bogus"),
                                          tmp_path)
    assert "dump level" in _untouched(memfd_guest, _dump(memfd_guest, tmp_path / "x", "--filter", "32"), tmp_path)
    assert "is a directory" in _untouched(memfd_guest, _dump(memfd_guest, tmp_path), tmp_path)
    # --force replaces regular files only: a FIFO, a device or a link stays what it is.
    fifo, link = tmp_path / "fifo", tmp_path / "link"
    os.mkfifo(fifo)
    link.symlink_to("/dev/null")
    for path in (fifo, link):
        assert "not a regular file" in _untouched(memfd_guest, _dump(memfd_guest, path, "--force"), tmp_path)
    assert fifo.is_fifo() and link.is_symlink() and Path("/dev/null").is_char_device()
    assert "without storage" in _untouched(memfd_guest, _dump(memfd_guest, Path("/proc/vm.elf")), tmp_path)
    # The longest name the directory takes works (the partial file's name is cut to fit); a longer one is refused.
    longest = tmp_path / ("v" * 255)
    r = _dump(memfd_guest, longest, "-q")
    assert r.returncode == 0 and longest.stat().st_size > 0, r.stderr
    longest.unlink()
    memfd_guest.clear_events()
    assert "file name too long" in _untouched(memfd_guest, _dump(memfd_guest, tmp_path / ("v" * 256)), tmp_path)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (root only)."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_not_enough_space(guest: QemuGuest, small_tmpfs: Path) -> None:
    """Space is checked inside the pause, before the first byte: one line
    saying how much is needed, exit 2, the guest resumed, no file."""
    guest.clear_events()
    r = _dump(guest, small_tmpfs / "vm.elf")
    line = _one_line(r)
    assert r.returncode == 2 and "not enough space" in line and "needs" in line, r.stderr
    assert guest.status() == "running"
    assert list(small_tmpfs.iterdir()) == []


def test_read_only_directory(memfd_guest: QemuGuest, small_tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    memfd_guest.clear_events()
    assert "read-only" in _untouched(memfd_guest, _dump(memfd_guest, small_tmpfs / "vm.elf"), small_tmpfs)


# -- interrupted copies -----------------------------------------------------------------

#: Bytes of non-zero RAM of the unbooted guest below (long enough a copy to interrupt).
BIG = 1 << 30


@pytest.fixture
def filled_guest(tmp_path: Path) -> Iterator[QemuGuest]:
    """A QEMU that never starts its vCPUs (-S, no TCG load) whose 1 GiB of
    RAM is a shared file on /dev/shm filled with non-zero bytes: every page
    is copied, so a dump takes long enough to be interrupted."""
    backing = Path("/dev/shm") / f"vmcorefs-test-fill-{os.getpid()}"
    pattern = os.urandom(1 << 20)
    with open(backing, "wb") as f:
        for _ in range(BIG >> 20):
            f.write(pattern)
    spec = GuestSpec("filled", mib=BIG >> 20, memory="none",
                     extra=("-S", "-m", f"{BIG >> 20}M", "-object",
                            f"memory-backend-file,id=mem0,size={BIG},mem-path={backing},share=on",
                            "-machine", "pc,memory-backend=mem0"))
    g = QemuGuest(spec)
    try:
        wait_for(lambda: os.path.exists(g.qmp_path) and os.path.exists(g.own_qmp_path), 30, "QEMU's sockets")
        g.qmp("cont")
        yield g
    finally:
        g.close()
        backing.unlink(missing_ok=True)


def _interrupt_mid_copy(g: QemuGuest, out: Path, act: object, *args: str, ready: Any = None,
                        **popen: Any) -> subprocess.CompletedProcess[str]:
    """Start ``vmcorefs dump ARGS`` (``popen``: more Popen arguments); as
    soon as ``ready(process)`` (by default: the partial file exists, the
    copy has started) stop it (SIGSTOP: a fast copy cannot end before
    ``act`` on a busy machine), call ``act(process)``, let it go on
    (SIGCONT: a signal ``act`` sent arrives now), wait for the dump to end."""
    def copying(_proc: object) -> bool:
        return any("vmcorefs-partial" in p.name for p in out.parent.iterdir())

    ready = ready or copying
    proc = spawn_vmcorefs("dump", *args, g.qmp_path, str(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          **popen)
    try:
        deadline = time.monotonic() + 120
        while not ready(proc):
            assert proc.poll() is None, f"dump ended too early: {proc.stderr.read()}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGSTOP)
        try:
            act(proc)  # type: ignore[operator]
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT])
def test_signal_mid_copy_resumes_and_removes(filled_guest: QemuGuest, tmp_path: Path, signum: int) -> None:
    out = tmp_path / "vm.elf"
    # With the signal's default action, whatever this run inherited (under
    # nohup SIGHUP is ignored, and a dump keeps an ignored signal ignored).
    r = _interrupt_mid_copy(filled_guest, out, lambda p: p.send_signal(signum),
                            preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    line = _one_line(r)
    assert r.returncode == 128 + signum, r.stderr
    assert "interrupted" in line and "guest resumed" in line and "partial file removed" in line
    assert filled_guest.status() == "running"
    assert list(tmp_path.iterdir()) == []


def test_sigint_ignored_at_start_stays_ignored(filled_guest: QemuGuest, tmp_path: Path) -> None:
    """A dump started with SIGINT ignored (a background job of a script,
    ``trap '' INT``) is not interrupted by one mid-copy: it completes."""
    out = tmp_path / "vm.elf"

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    r = _interrupt_mid_copy(filled_guest, out, lambda p: p.send_signal(signal.SIGINT), preexec_fn=ignore_sigint)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > BIG and filled_guest.status() == "running"
    assert [p.name for p in tmp_path.iterdir()] == ["vm.elf"]


@pytest.mark.parametrize("paused_before", [False, True], ids=["running", "paused-by-another"])
def test_resume_by_another_client_mid_copy_fails(filled_guest: QemuGuest, tmp_path: Path,
                                                 paused_before: bool) -> None:
    """Another QMP client resumes the guest mid-copy (``cont`` on the other
    monitor; or, paused before, as another dump's end would): the image
    would mix instants, so the dump fails with one line, exit 1, no file."""
    out = tmp_path / "vm.elf"
    if paused_before:
        filled_guest.qmp("stop")
    try:
        r = _interrupt_mid_copy(filled_guest, out, lambda p: filled_guest.qmp("cont"))
    finally:
        if filled_guest.status() != "running":
            filled_guest.qmp("cont")
    line = _one_line(r)
    assert r.returncode == 1, r.stderr
    assert "resumed by another QMP client during the copy" in line and "partial file removed" in line, line
    assert list(tmp_path.iterdir()) == []


def test_signal_once_the_output_is_in_place_changes_nothing(filled_guest: QemuGuest, tmp_path: Path) -> None:
    """A SIGTERM that arrives once OUTPUT has its name (the dump closing its
    monitor) leaves the dump a success: exit 0, the file kept, its summary."""
    out = tmp_path / "vm.elf"
    r = _interrupt_mid_copy(filled_guest, out, lambda p: p.send_signal(signal.SIGTERM),
                            ready=lambda p: out.exists(),
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    assert r.returncode == 0, r.stderr
    assert SUMMARY.search(r.stderr) and "interrupted" not in r.stderr, r.stderr
    assert out.stat().st_size > BIG and filled_guest.status() == "running"


def test_signal_during_the_dumps_own_resume(filled_guest: QemuGuest, tmp_path: Path) -> None:
    """SIGTERM while the dump's ``cont`` is unanswered (QEMU stopped with
    SIGSTOP from the copy's start: its memory is still read, its monitor
    does not answer): once QEMU answers, one line that says the guest was
    resumed (not "still paused"), exit 143, nothing left."""
    out = tmp_path / "vm.elf"
    proc = spawn_vmcorefs("dump", filled_guest.qmp_path, str(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    stopped = False
    try:
        deadline = time.monotonic() + 120
        while not (partial := [p for p in tmp_path.iterdir() if "vmcorefs-partial" in p.name]):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.002)
        os.kill(filled_guest.pid, signal.SIGSTOP)
        stopped = True
        # The copy goes on (process_vm_readv reads a stopped process) and ends; then its cont waits.
        last, since = -1, time.monotonic()
        while time.monotonic() - since < 0.5:
            blocks = os.stat(partial[0]).st_blocks
            if blocks != last:
                last, since = blocks, time.monotonic()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        os.kill(filled_guest.pid, signal.SIGCONT)
        stopped = False
        _, stderr = proc.communicate(timeout=60)
    finally:
        if stopped:
            os.kill(filled_guest.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    line = _one_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr))
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM; guest resumed, partial file removed" in line, line
    assert filled_guest.status() == "running"
    assert list(tmp_path.iterdir()) == []


def test_output_that_appears_during_the_dump_is_kept(filled_guest: QemuGuest, tmp_path: Path) -> None:
    """OUTPUT did not exist at the start but does at the end (another dump,
    the user): without --force it is not replaced; one line, exit 2."""
    out = tmp_path / "vm.elf"
    r = _interrupt_mid_copy(filled_guest, out, lambda p: out.write_text("the user's file\n"))
    line = _one_line(r)
    assert r.returncode == 2 and "already exists" in line and "appeared during the dump" in line, r.stderr
    assert out.read_text() == "the user's file\n" and filled_guest.status() == "running"
    _no_partial(tmp_path)


def test_filter_without_vmcoreinfo_is_refused_before_the_copy(filled_guest: QemuGuest, tmp_path: Path) -> None:
    """No kernel in the guest, so no VMCOREINFO: makedumpfile could not
    filter; one line, exit 2, the guest resumed, no file."""
    r = _dump(filled_guest, tmp_path / "vm.kdump", "--filter", "31", "--format", "kdump-zlib")
    line = _one_line(r)
    assert r.returncode == 2 and "VMCOREINFO" in line and "--filter" in line, r.stderr
    assert filled_guest.status() == "running"
    assert list(tmp_path.iterdir()) == []


def _filtering(pid: int) -> bool:
    """Whether process ``pid`` has a makedumpfile child filtering (not its version probe)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{d}/stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
                    if argv[0].endswith(b"makedumpfile") and b"--message-level" in argv:
                        return True
    return False


def test_ctrl_c_during_filter_is_an_interrupt(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    """Ctrl-C on a terminal signals the whole foreground process group:
    while makedumpfile filters, that is an interrupt of the dump (exit 130,
    no file), not a makedumpfile failure."""
    out = tmp_path / "vm.kdump"
    r = _interrupt_mid_copy(memfd_guest, out, lambda p: os.killpg(p.pid, signal.SIGINT),  # what the terminal does
                            "--filter", "31", "--format", "kdump-zlib", ready=lambda p: _filtering(p.pid),
                            start_new_session=True)
    line = _one_line(r)
    assert r.returncode == 130 and "interrupted" in line and "makedumpfile" not in line, r.stderr
    assert memfd_guest.status() == "running"
    assert list(tmp_path.iterdir()) == []


def test_qemu_stopped_mid_copy_says_the_guest_is_still_paused(filled_guest: QemuGuest, tmp_path: Path) -> None:
    """QEMU SIGSTOPped during the copy: its cont gets no answer within
    --timeout 2; the dump's line says so and that the guest is still
    paused, exit 1, no file; once QEMU runs again (SIGCONT after the dump
    exited) the watchdog resumes the guest."""
    out = tmp_path / "vm.elf"
    proc = spawn_vmcorefs("dump", "--timeout", "2", filled_guest.qmp_path, str(out),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any("vmcorefs-partial" in p.name for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        proc.send_signal(signal.SIGSTOP)  # (as _interrupt_mid_copy: the copy cannot end first)
        os.kill(filled_guest.pid, signal.SIGSTOP)
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=60)
        os.kill(filled_guest.pid, signal.SIGCONT)
        stderr = proc.stderr.read()  # type: ignore[union-attr]  # until the watchdog (same stderr) is done
    finally:
        os.kill(filled_guest.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("vmcorefs: QMP cont") and "guest still paused" in lines[0], stderr
    assert "partial file removed" in lines[0]
    assert all(ln.startswith("vmcorefs watchdog: ") and "resumed" in ln for ln in lines[1:]), stderr
    wait_for(lambda: filled_guest.status() == "running", 30, "the watchdog's resume")
    assert list(tmp_path.iterdir()) == []


def test_qemu_killed_mid_copy(filled_guest: QemuGuest, tmp_path: Path) -> None:
    out = tmp_path / "vm.elf"

    def kill(_p: object) -> None:
        filled_guest.proc.kill()

    r = _interrupt_mid_copy(filled_guest, out, kill)
    line = _one_line(r)
    assert r.returncode == 1 and "QEMU" in line and "partial file removed" in line, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_sigkill_mid_copy_watchdog_resumes_and_removes(filled_guest: QemuGuest, tmp_path: Path) -> None:
    """SIGKILL of the dump while it holds the guest paused (nothing in it
    runs): its watchdog resumes the guest and removes the hidden partial
    file, and says so."""
    out = tmp_path / "vm.elf"

    def kill(p: subprocess.Popen[str]) -> None:
        assert filled_guest.status() == "paused"  # the copy runs inside the dump's pause
        p.kill()

    r = _interrupt_mid_copy(filled_guest, out, kill)
    assert r.returncode == -signal.SIGKILL, r.stderr
    # Generous bounds: the watchdog waits for QEMU to take the next monitor client.
    wait_for(lambda: filled_guest.status() == "running", 60, "the guest running again")
    wait_for(lambda: list(tmp_path.iterdir()) == [], 60, "the partial file removed")
    assert "vmcorefs watchdog: vmcorefs exited; the guest was paused: guest resumed" in r.stderr, r.stderr
    assert "vmcorefs-partial" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_progress_on_a_terminal_only(filled_guest: QemuGuest, memfd_guest: QemuGuest, tmp_path: Path) -> None:
    """On a terminal: a progress bar (bytes, rate, ETA) then the summary;
    not a terminal: the summary alone; --quiet: nothing."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def read_terminal() -> None:
        with contextlib.suppress(OSError):  # EIO once the child closed the terminal
            while chunk := os.read(master, 65536):
                chunks.append(chunk)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    # The filled guest (1 GiB to copy), its copy held 0.3 s as it starts: the
    # bar's next refresh then has a rate and an ETA however fast the copy
    # (a 256 MiB guest's copy once ended before the bar's first refresh).
    proc = spawn_vmcorefs("dump", filled_guest.qmp_path, str(tmp_path / "tty.elf"),
                          stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    try:
        deadline = time.monotonic() + 120
        while not any("vmcorefs-partial" in p.name for p in tmp_path.iterdir()) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=120) == 0, b"".join(chunks)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        os.close(master)
    seen = b"".join(chunks)
    text = seen.decode(errors="replace")
    assert re.search(r"copying:\s+\d+%\|.*\| [\d.]+\w?/[\d.]+\w? \[\d\d:\d\d<\d\d:\d\d, ", text), text
    assert SUMMARY.search(text.replace("\r\n", "\n").replace("\r", "\n")), text
    r = _dump(memfd_guest, tmp_path / "pipe.elf")
    assert r.returncode == 0 and len(r.stderr.splitlines()) == 1 and SUMMARY.search(r.stderr), r.stderr
    r = _dump(memfd_guest, tmp_path / "quiet.elf", "--quiet")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr


def test_crash_510_same_on_dumps_as_on_qemus(tmp_path: Path) -> None:
    """A Debian 11 (5.10) guest, which Debian 12's crash 8.0.2 understands
    fully: crash prints the same (sys, ps, bt of PID 1) on vmcorefs' ELF and
    kdump-zlib of a paused instant as on QEMU's own dump of it."""
    require(DEBIAN11.vmlinux.exists(), "no 5.10 debug vmlinux (scripts/build-guest.sh --old --dbg)")
    commands = "sys\nps\nbt 1"
    with QemuGuest(GuestSpec("k510", kernel=DEBIAN11, mib=512, memory="private")) as g:
        with g.paused():
            for name, args in (("ours.elf", ()), ("ours.kdump", ("--format", "kdump-zlib"))):
                r = _dump(g, tmp_path / name, *args)
                assert r.returncode == 0, r.stderr
            g.dump(tmp_path / "qemu.elf")
        outputs = {name: run_crash(DEBIAN11.vmlinux, tmp_path / name, commands)
                   for name in ("qemu.elf", "ours.elf", "ours.kdump")}

    def normal(text: str) -> list[str]:
        # The file's name, and the date a kdump header carries (the dump's, not the guest clock's).
        return [ln for ln in text.splitlines() if not re.match(r"\s*(DUMPFILE|DATE):", ln)]

    theirs = normal(outputs["qemu.elf"])
    assert any("[kthreadd]" in ln for ln in theirs) and any(ln.startswith("PID: 1 ") for ln in theirs), theirs
    assert normal(outputs["ours.elf"]) == theirs
    assert normal(outputs["ours.kdump"]) == theirs
