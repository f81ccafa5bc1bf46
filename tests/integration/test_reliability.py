"""Reliability and security: faults injected into real guests and daemons,
concurrent readers checked byte for byte, permissions with a real second user."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import pwd
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from elftools.elf.elffile import ELFFile

from vmcorefs.testing import (
    SRC,
    GuestSpec,
    Mount,
    QemuGuest,
    daemon_pid,
    require,
    run_vmcorefs,
    spawn_vmcorefs,
    unmount,
    unmount_and_wait,
    wait_for,
    wait_mounted,
)

pytestmark = pytest.mark.integration
TEST_USER = "vmcorefs-test"


def _daemon_pid(mnt: Path) -> int:
    pid = daemon_pid(mnt)
    assert pid is not None, f"no vmcorefs daemon serves {mnt}"
    return pid


def _loads(path: Path) -> list[tuple[int, int, int]]:
    with open(path, "rb") as f:
        return [(s["p_paddr"], s["p_memsz"], s["p_offset"])
                for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]


# -- faults ----------------------------------------------------------------

def test_qemu_stopped_during_open(memfd_guest: QemuGuest) -> None:
    """SIGSTOP: open fails after the timeout, open handles still read, SIGCONT heals."""
    g = memfd_guest
    with Mount(g, "--timeout", "2") as m:
        fd = os.open(m.vmcore, os.O_RDONLY)
        before = os.pread(fd, 1 << 20, 1 << 20)
        os.kill(g.pid, signal.SIGSTOP)
        try:
            # The bounds leave room for a busy host; a hang would never end.
            t = time.monotonic()
            with pytest.raises(OSError) as e:
                os.open(m.vmcore, os.O_RDONLY)
            assert e.value.errno == errno.ETIMEDOUT
            assert time.monotonic() - t < 30
            # Memory needs no QMP: the open handle still reads, and stat
            # answers from the last known layout.
            assert len(os.pread(fd, 1 << 20, 1 << 20)) == len(before)
            t = time.monotonic()
            assert os.stat(m.vmcore).st_size > 0
            assert time.monotonic() - t < 30
        finally:
            os.kill(g.pid, signal.SIGCONT)
        fd2 = os.open(m.vmcore, os.O_RDONLY)
        assert len(os.pread(fd2, 4096, 0)) == 4096
        os.close(fd2)
        os.close(fd)


def test_guest_reboot_while_mounted() -> None:
    with QemuGuest(GuestSpec("reboot", mib=128, reboot=True)) as g:
        with Mount(g) as m:
            old = os.open(m.vmcore, os.O_RDONLY)
            g.serial.write_bytes(b"")
            g.qmp("system_reset")
            g.wait_ready()
            assert len(os.pread(old, 1 << 16, 1 << 20)) == 1 << 16
            os.close(old)
            wait_for(lambda: (m.path / "vmcoreinfo").exists(), 60, "VMCOREINFO after reboot")
            assert (m.path / "vmcoreinfo").read_text().startswith(f"OSRELEASE={g.release}")
            assert len(_loads(m.vmcore)) >= 1


def test_daemon_killed_then_remount(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run_vmcorefs("mount", memfd_guest.qmp_path, str(mnt))
    assert r.returncode == 0, r.stderr
    try:
        pid = _daemon_pid(mnt)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "daemon death")
        with pytest.raises(OSError) as e:
            os.stat(mnt / "vmcore")
        assert e.value.errno == errno.ENOTCONN  # "Transport endpoint is not connected"
        r = run_vmcorefs("mount", memfd_guest.qmp_path, str(mnt))
        assert r.returncode == 2 and "stale FUSE mount" in r.stderr and "fusermount3 -u" in r.stderr
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        time.sleep(0.3)  # the killed daemon's QMP connection is gone
        r = run_vmcorefs("mount", memfd_guest.qmp_path, str(mnt))
        assert r.returncode == 0, r.stderr
        assert os.stat(mnt / "vmcore").st_size > 0
    finally:
        unmount_and_wait(mnt, daemon_pid(mnt))


def test_freeze_resumed_when_daemon_exits(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    g = memfd_guest
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon = spawn_vmcorefs("mount", "-f", "--freeze", g.qmp_path, str(mnt), stderr=subprocess.PIPE)
    try:
        wait_mounted(mnt, daemon)
        fd = os.open(mnt / "vmcore", os.O_RDONLY)
        assert g.status() == "paused"
        daemon.terminate()
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read() if daemon.stderr else ""
        assert g.status() == "running"
        with pytest.raises(OSError):
            os.pread(fd, 4096, 0)
        with pytest.raises(OSError):  # the flush at close finds no daemon either
            os.close(fd)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        unmount(mnt)
        if g.status() != "running":
            g.qmp("cont")
        time.sleep(0.3)


# -- correctness under load -------------------------------------------------

@pytest.fixture
def frozen_oracle(memfd_guest: QemuGuest) -> Iterator[tuple[Mount, Path]]:
    """A paused guest, mounted, with QEMU's own dump of it in /dev/shm."""
    g = memfd_guest
    oracle = Path("/dev/shm") / f"vmcorefs-oracle-{os.getpid()}.dump"
    with g.paused(), Mount(g) as m:
        g.dump(oracle)
        try:
            yield m, oracle
        finally:
            oracle.unlink(missing_ok=True)


def _random_verify(m: Mount, oracle: Path, seconds: float, readers: int = 8) -> tuple[int, int]:
    """``readers`` threads read random ranges of vmcore, pmem and kcore and
    compare with QEMU's dump; returns (bytes read, mismatches)."""
    ours_loads, their_loads = _loads(m.vmcore), _loads(oracle)
    assert [(p, n) for p, n, _ in ours_loads] == [(p, n) for p, n, _ in their_loads]
    kcore_loads = _loads(m.path / "kcore")
    assert kcore_loads

    def oracle_offset(paddr: int, length: int) -> int:
        for p, n, off in their_loads:
            if p <= paddr and paddr + length <= p + n:
                return off + paddr - p
        raise AssertionError(f"{paddr:#x}+{length} not in one PT_LOAD of QEMU's dump")

    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    totals = [0, 0]

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fds = {name: os.open(m.path / name, os.O_RDONLY) for name in ("vmcore", "pmem", "kcore")}
        ofd = os.open(oracle, os.O_RDONLY)
        nbytes = bad = 0
        try:
            while time.monotonic() < deadline:
                name = rng.choice(["vmcore", "pmem", "kcore"])
                paddr, size, off = rng.choice(kcore_loads if name == "kcore" else ours_loads)
                length = rng.choice([1, 7, 512, 4096, 65536, 131072, 1 << 20])
                delta = rng.randrange(max(1, size - length))
                length = min(length, size - delta)
                want = os.pread(ofd, length, oracle_offset(paddr + delta, length))
                got = os.pread(fds[name], length, (paddr if name == "pmem" else off) + delta)
                nbytes += len(got)
                bad += got != want
        finally:
            for fd in (*fds.values(), ofd):
                os.close(fd)
        with lock:
            totals[0] += nbytes
            totals[1] += bad

    with concurrent.futures.ThreadPoolExecutor(readers) as ex:
        for f in [ex.submit(reader, s) for s in range(readers)]:
            f.result()
    return totals[0], totals[1]


def test_concurrent_readers_frozen(frozen_oracle: tuple[Mount, Path]) -> None:
    nbytes, mismatches = _random_verify(*frozen_oracle, seconds=8)
    assert nbytes > 1 << 20
    assert mismatches == 0


@pytest.mark.soak
def test_soak(frozen_oracle: tuple[Mount, Path]) -> None:
    seconds = float(os.environ.get("VMCOREFS_SOAK_SECONDS", "600"))
    nbytes, mismatches = _random_verify(*frozen_oracle, seconds=seconds)
    print(f"\nsoak: {seconds:.0f} s, {nbytes} bytes read by 8 readers, {mismatches} mismatches")
    assert mismatches == 0


def test_eight_vcpus_notes_and_bytes(tmp_path: Path) -> None:
    with QemuGuest(GuestSpec("smp8", mib=128, vcpus=8)) as g:
        with g.paused(), Mount(g) as m:
            oracle = g.dump(tmp_path / "q.dump")
            for tool in ("readelf", "eu-readelf"):
                r = subprocess.run([tool, "-n", "-l", str(m.vmcore)], capture_output=True, text=True)
                assert r.returncode == 0 and r.stderr == "", r.stderr
                assert r.stdout.count("PRSTATUS") == 8
            with open(m.vmcore, "rb") as ours, open(oracle, "rb") as theirs:
                notes = [(s["p_offset"], s["p_filesz"]) for e in (ELFFile(ours), ELFFile(theirs))
                         for s in e.iter_segments() if s["p_type"] == "PT_NOTE"]
                ours.seek(notes[0][0])
                theirs.seek(notes[1][0])
                assert ours.read(notes[0][1]) == theirs.read(notes[1][1])


# -- security ---------------------------------------------------------------

@pytest.fixture(scope="module")
def other_user() -> str:
    require(os.geteuid() == 0, "needs root to create a second user")
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       check=True)
    return TEST_USER


def _as(user: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", *cmd], capture_output=True, text=True, timeout=30)


def test_other_user_cannot_read(memfd_guest: QemuGuest, other_user: str) -> None:
    with Mount(memfd_guest) as m:
        r = _as(other_user, "head", "-c", "16", str(m.vmcore))
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = _as(other_user, "stat", str(m.path))
        assert r.returncode != 0 and "Permission denied" in r.stderr
    with Mount(memfd_guest, "--allow-other") as m:
        r = _as(other_user, "stat", "-c", "%a %U", str(m.path))
        assert r.returncode == 0, r.stderr
        r = _as(other_user, "head", "-c", "16", str(m.vmcore))
        assert r.returncode != 0 and "Permission denied" in r.stderr
        assert oct(os.stat(m.vmcore).st_mode & 0o777) == "0o400"
    with Mount(memfd_guest, "--allow-other", "--mode", "0444") as m:
        r = subprocess.run(["runuser", "-u", other_user, "--", "head", "-c", "4", str(m.vmcore)],
                           capture_output=True, timeout=30)
        assert r.returncode == 0 and r.stdout == b"\x7fELF"


def test_no_writes_and_read_only_descriptors(guest: QemuGuest) -> None:
    with Mount(guest) as m:
        for path in (m.vmcore, m.pmem):
            with pytest.raises(OSError) as e:
                os.open(path, os.O_WRONLY)
            assert e.value.errno in (errno.EROFS, errno.EACCES)
            with pytest.raises(OSError) as e:
                os.truncate(path, 0)
            assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
            with pytest.raises(OSError):
                os.chmod(path, 0o600)
        with pytest.raises(OSError):
            (m.path / "new").write_bytes(b"x")
        # Every descriptor the daemon holds on guest memory is read-only.
        pid = _daemon_pid(m.path)
        seen = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.endswith("/mem") or "memfd:" in target:
                flags = int(open(f"/proc/{pid}/fdinfo/{fd}").read().split("flags:")[1].split()[0], 8)
                assert flags & os.O_ACCMODE == os.O_RDONLY, (target, oct(flags))
                seen += 1
        assert seen >= 1


def test_memory_modes(guest: QemuGuest) -> None:
    """--memory shared needs a shared backend; procmem works everywhere."""
    memfd = guest.spec.memory == "memfd"
    r = run_vmcorefs("info", "--json", "--memory", "procmem", guest.qmp_path)
    assert r.returncode == 0, r.stderr
    assert '"access": "shared"' not in r.stdout
    r = run_vmcorefs("info", "--memory", "shared", guest.qmp_path)
    if memfd:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "not in a shared file mapping" in r.stderr and "--memory procmem" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_no_permission_names_the_fix(memfd_guest: QemuGuest, other_user: str) -> None:
    """A user who may talk to QMP but not look into QEMU gets one line and the fix."""
    import shutil
    import tempfile

    import qemu.qmp

    require(os.path.exists("/usr/bin/python3"), "system python3 missing")
    # The venv's interpreter lives under /root: the other user runs the system
    # Python 3.11 on a world-readable copy of vmcorefs and qemu.qmp.
    code = Path(tempfile.mkdtemp(dir="/tmp"))
    shutil.copytree(SRC / "vmcorefs", code / "vmcorefs")
    shutil.copytree(Path(qemu.qmp.__file__).parents[1], code / "qemu")
    sock = Path(memfd_guest.qmp_path)
    saved = [(p, os.stat(p).st_mode & 0o777) for p in (sock, sock.parent)]
    for path in [code, *code.rglob("*")]:
        os.chmod(path, 0o755)
    os.chmod(sock.parent, 0o755)
    os.chmod(sock, 0o777)
    try:
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(code), "HOME": "/tmp"}
        r = subprocess.run(["runuser", "-u", other_user, "--", "/usr/bin/python3", "-m", "vmcorefs", "info",
                            str(sock)], capture_output=True, text=True, timeout=60, env=env)
    finally:
        for path, mode in saved:
            os.chmod(path, mode)
        shutil.rmtree(code)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no permission" in lines[0] and "root" in lines[0], lines[0]
