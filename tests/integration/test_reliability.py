"""Reliability and security: faults injected into real guests and daemons,
concurrent readers checked byte for byte, permissions with a real second user."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from elftools.elf.elffile import ELFFile

from vmcorefs.testing import SRC, GuestSpec, Mount, QemuGuest, daemon_pid, require, run_vmcorefs
from vmcorefs.testing import spawn_vmcorefs, unmount, unmount_and_wait, wait_for, wait_mounted

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


def _loads_of(fd: int) -> list[tuple[int, int, int]]:
    with os.fdopen(os.dup(fd), "rb") as f:
        return [(s["p_paddr"], s["p_memsz"], s["p_offset"])
                for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]


def _daemon_figures(pid: int) -> tuple[int, int, int]:
    """(open descriptors, RssAnon KiB, VmRSS KiB) of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        fields = {k: v.split()[0] for k, _, v in (line.partition(":") for line in f) if v.strip()}
    return len(os.listdir(f"/proc/{pid}/fd")), int(fields["RssAnon"]), int(fields["VmRSS"])


class _Soak:
    """The soak's moving parts: a guest with a free DIMM slot that reboots,
    mount ``a`` (cached) read by 8 readers, mount ``b`` (``--freeze
    --direct``, on a third monitor) opened again and again by a freezer
    thread that checks the guest's state on a fourth monitor."""

    def __init__(self, g: QemuGuest, a: Mount, b: Mount, status_socket: str) -> None:
        self.g, self.a, self.b = g, a, b
        self.status_socket = status_socket
        #: Held by the freezer around each open..close, and by the test around
        #: its own pause/resume and the hotplug/reboot: a --freeze hold never
        #: straddles them (a `stop` of a guest already paused by vmcorefs is
        #: invisible to it, so its release would resume the test's pause).
        self.lock = threading.Lock()
        self.stop = threading.Event()
        #: QEMU's dump while the test holds the guest paused, else None.
        self.oracle: Path | None = None
        self.their_loads: list[tuple[int, int, int]] = []
        self.counts = {"freeze_opens": 0, "freeze_verified": 0, "freeze_mismatches": 0, "freeze_problems": 0,
                       "live_bytes": 0, "live_errors": 0, "verified_bytes": 0, "mismatches": 0}
        self.problems: list[str] = []
        self.cycles = 0
        self.phase = ""

    def _problem(self, key: str, what: str) -> None:
        self.counts[key] += 1
        if len(self.problems) < 20:
            self.problems.append(what)

    def freezer(self) -> None:
        """Open b/vmcore again and again: the guest is paused while it is
        open (and resumed after, if it ran before); its bytes do not change
        while open, and equal QEMU's dump while the test holds a pause."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        qmp = QEMUMonitorProtocol(self.status_socket)
        qmp.connect()
        rng = random.Random(1)

        def status() -> str:
            return str(qmp.cmd("query-status")["status"])

        try:
            while not self.stop.is_set():
                with self.lock:
                    oracle = self.oracle
                    before = status()
                    fd = os.open(self.b.vmcore, os.O_RDONLY)
                    try:
                        self.counts["freeze_opens"] += 1
                        if status() != "paused":
                            self._problem("freeze_problems", f"guest {status()} while vmcore open (was {before})")
                        loads = _loads_of(fd)
                        paddr, size, off = rng.choice(loads)
                        length = min(rng.choice([4096, 65536, 1 << 20]), size)
                        delta = rng.randrange(max(1, size - length))
                        first = os.pread(fd, length, off + delta)
                        if oracle is not None:
                            assert [(p, n) for p, n, _ in loads] == [(p, n) for p, n, _ in self.their_loads]
                            their = next(o for p, n, o in self.their_loads if p == paddr)
                            with open(oracle, "rb") as f:
                                f.seek(their + delta)
                                want = f.read(length)
                            self.counts["freeze_verified"] += 1
                            if first != want:
                                self._problem("freeze_mismatches", f"--freeze read at {paddr + delta:#x} != dump")
                        else:
                            time.sleep(0.05)
                            if os.pread(fd, length, off + delta) != first:
                                self._problem("freeze_mismatches", f"bytes at {paddr + delta:#x} moved under --freeze")
                    finally:
                        os.close(fd)
                    if before == "running":  # FUSE_RELEASE is asynchronous: the resume follows soon
                        deadline = time.monotonic() + 30
                        while status() != "running" and time.monotonic() < deadline:
                            time.sleep(0.01)
                        if status() != "running":
                            self._problem("freeze_problems", "guest not resumed after the last close")
                time.sleep(rng.uniform(0.02, 0.2))
        finally:
            qmp.close()

    def live_reader(self, seed: int, deadline: float, opened: threading.Semaphore) -> None:
        """Random reads of a's vmcore, pmem and kcore while the guest runs:
        every read answers in full (no EIO, no short read)."""
        rng = random.Random(seed)
        fds: dict[str, int] = {}
        try:
            for name in ("vmcore", "pmem", "kcore"):
                try:
                    fds[name] = os.open(self.a.path / name, os.O_RDONLY)
                except OSError as e:
                    self._problem("live_errors", f"{self.phase}: open {name}: {e}")
                    break
        finally:
            opened.release()  # the event (hotplug, reboot) waits for every reader's handles
        try:
            if len(fds) < 3:
                return
            loads = {name: _loads_of(fds[name]) for name in ("vmcore", "kcore")}
            loads["pmem"] = [(p, n, p) for p, n, _ in loads["vmcore"]]
            while time.monotonic() < deadline:
                name = rng.choice(["vmcore", "pmem", "kcore"])
                _, size, off = rng.choice(loads[name])
                length = min(rng.choice([1, 512, 4096, 65536, 1 << 20]), size)
                delta = rng.randrange(max(1, size - length))
                try:
                    got = os.pread(fds[name], length, off + delta)
                except OSError as e:
                    self._problem("live_errors", f"{self.phase}: {name} at {off + delta:#x}: {e}")
                    continue
                if len(got) != length:
                    end = max(o + n for _, n, o in loads[name]) if name != "pmem" else loads[name][-1][0]
                    self._problem("live_errors", f"{self.phase}: {name} at {off + delta:#x}: {len(got)} of {length}"
                                  f" bytes (its layout ends at {end:#x}, st_size now {os.fstat(fds[name]).st_size:#x})")
                self.counts["live_bytes"] += len(got)
        finally:
            for fd in fds.values():
                os.close(fd)

    def running_phase(self, seconds: float, event: str | None) -> None:
        self.phase = f"running phase {self.cycles} ({event or 'no event'})"
        deadline = time.monotonic() + seconds
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            opened = threading.Semaphore(0)
            readers = [ex.submit(self.live_reader, s, deadline, opened) for s in range(8)]
            for _ in readers:
                assert opened.acquire(timeout=300), "readers did not open their files"
            time.sleep(seconds / 3)
            if event == "hotplug":
                with self.lock:
                    self.g.qmp("object-add", **{"qom-type": "memory-backend-memfd", "id": "d0",
                                                "size": 128 << 20, "share": True})
                    self.g.qmp("device_add", driver="pc-dimm", id="dimm0", memdev="d0")
            elif event == "reboot":
                with self.lock:
                    self.g.serial.write_bytes(b"")
                    self.g.qmp("system_reset")
                    self.g.wait_ready()
            for f in readers:
                f.result()
        wait_for(lambda: self._kcore_ready(), 120, "kcore after the event")

    def _kcore_ready(self) -> bool:
        try:
            return bool(_loads(self.a.kcore))
        except OSError:
            return False

    def verified_phase(self, seconds: float) -> None:
        oracle = Path("/dev/shm") / f"vmcorefs-soak-{os.getpid()}.dump"
        with self.lock:
            self.g.qmp("stop")
            self.g.dump(oracle)
            self.their_loads = _loads(oracle)
            self.oracle = oracle
        try:
            nbytes, bad = _random_verify(self.a, oracle, seconds)
            self.counts["verified_bytes"] += nbytes
            self.counts["mismatches"] += bad
        finally:
            with self.lock:
                self.oracle = None
                self.g.qmp("cont")
            oracle.unlink(missing_ok=True)

    def figures(self) -> dict[str, tuple[int, int, int]]:
        """Descriptors and memory of both daemons, taken with the freezer idle."""
        with self.lock:
            return {name: _daemon_figures(m.daemon_pid or 0) for name, m in (("a", self.a), ("b", self.b))}


@pytest.mark.soak
def test_soak() -> None:
    """8 readers on vmcore/pmem/kcore, a DIMM hotplug, guest reboots and
    repeated --freeze opens for VMCOREFS_SOAK_SECONDS (default 600): every
    verified byte equals QEMU's dump, no read fails, no daemon leaks
    descriptors or grows by more than 10 MiB."""
    seconds = float(os.environ.get("VMCOREFS_SOAK_SECONDS", "600"))
    cycle = max(20.0, seconds / 10)
    d = Path(tempfile.mkdtemp(prefix="vmcorefs-soak-"))
    freeze_socket, status_socket = d / "freeze-qmp.sock", d / "status-qmp.sock"
    spec = GuestSpec("soak", mib=256, memory="none", reboot=True, extra=(
        "-m", "256M,slots=2,maxmem=1G",
        "-object", "memory-backend-memfd,id=mem0,size=256M,share=on", "-machine", "memory-backend=mem0",
        "-qmp", f"unix:{freeze_socket},server=on,wait=off", "-qmp", f"unix:{status_socket},server=on,wait=off"))
    try:
        logs = {"a": d / "a.log", "b": d / "b.log"}
        with QemuGuest(spec, directory=d) as g, Mount(g, "--debug", "--log-file", str(logs["a"])) as a, \
                Mount(g, "--freeze", "--direct", "--debug", "--log-file", str(logs["b"]),
                      socket=str(freeze_socket)) as b:
            soak = _Soak(g, a, b, str(status_socket))
            freezer = threading.Thread(target=soak.freezer)
            freezer.start()
            t0 = time.monotonic()
            baseline: dict[str, tuple[int, int, int]] = {}
            try:
                n = 0
                while n < 2 or time.monotonic() - t0 < seconds:
                    # Hotplug in the first cycle, a reboot in every third from the second.
                    event = "hotplug" if n == 0 else "reboot" if n % 3 == 1 else None
                    soak.running_phase(cycle / 2, event)
                    soak.verified_phase(cycle / 2)
                    n = soak.cycles = n + 1
                    if n == 2:  # after the first hotplug and reboot: the steady state
                        baseline = soak.figures()
            finally:
                soak.stop.set()
                freezer.join()
            final = soak.figures()
        if soak.problems:  # what the daemons said about it
            for name, path in logs.items():
                for line in path.read_text(errors="replace").splitlines():
                    if " WARNING " in line or " ERROR " in line or "no kcore" in line:
                        print(f"daemon {name} log: {line[:300]}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    elapsed = time.monotonic() - t0
    print(f"\nsoak: {elapsed:.0f} s, {n} cycles; {soak.counts}")
    for name in ("a", "b"):
        (fds0, anon0, rss0), (fds1, anon1, rss1) = baseline[name], final[name]
        print(f"daemon {name}: descriptors {fds0} -> {fds1}, RssAnon {anon0} -> {anon1} KiB,"
              f" VmRSS {rss0} -> {rss1} KiB")
    for what in soak.problems:
        print("problem:", what)
    c = soak.counts
    assert c["mismatches"] == 0 and c["freeze_mismatches"] == 0
    assert c["live_errors"] == 0 and c["freeze_problems"] == 0
    assert c["verified_bytes"] > 0 and c["live_bytes"] > 0 and c["freeze_verified"] > 0 and c["freeze_opens"] > 10
    for name in ("a", "b"):
        assert final[name][0] <= baseline[name][0], f"daemon {name} leaks descriptors"
        assert final[name][1] - baseline[name][1] < 10 << 10, f"daemon {name} grew by more than 10 MiB"


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
    else:  # what the option asks cannot be had: a usage error
        assert r.returncode == 2 and "Traceback" not in r.stderr
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
