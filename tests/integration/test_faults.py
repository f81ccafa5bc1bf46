"""Bad input and faults: one clear line, the right exit code, nothing mounted, no hang."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from vmcorefs.testing import (
    GuestSpec,
    Mount,
    QemuGuest,
    is_mounted,
    run_vmcorefs,
    spawn_vmcorefs,
    unmount,
    wait_for,
    wait_mounted,
)

pytestmark = pytest.mark.integration


def _one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vmcorefs: ")
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "mnt"
    d.mkdir()
    yield d
    unmount(d)


@pytest.fixture
def silent_socket(tmp_path: Path) -> Iterator[str]:
    """A unix socket that accepts and then says nothing (not QMP)."""
    path = str(tmp_path / "silent.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path
    stop.set()
    t.join()
    for c in conns:
        c.close()
    srv.close()


def test_socket_missing(mnt: Path) -> None:
    _one_line_error(run_vmcorefs("mount", "/nonexistent/qmp.sock", str(mnt)), 2, "no such QMP socket")
    assert not is_mounted(mnt)


def test_socket_not_a_socket(mnt: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(run_vmcorefs("mount", str(f), str(mnt)), 2, "not a unix socket")
    _one_line_error(run_vmcorefs("info", str(f)), 2, "not a unix socket")


def test_socket_not_qmp(mnt: Path, silent_socket: str) -> None:
    t = time.monotonic()
    r = run_vmcorefs("mount", silent_socket, str(mnt), timeout=60)
    assert time.monotonic() - t < 30  # no hang: vmcorefs waits 5 s for the greeting
    _one_line_error(r, 2, "not a QMP monitor")
    assert not is_mounted(mnt)


def test_usage_errors() -> None:
    _one_line_error(run_vmcorefs("mount"), 2)
    _one_line_error(run_vmcorefs("frobnicate"), 2)
    _one_line_error(run_vmcorefs("mount", "--memory", "bogus", "a", "b"), 2)
    _one_line_error(run_vmcorefs("mount", "--reads", "bogus", "a", "b"), 2)
    _one_line_error(run_vmcorefs("mount", "--max-age", "0", "a", "b"), 2)
    _one_line_error(run_vmcorefs("mount", "--direct", "--max-age", "2", "a", "b"), 2, "--max-age")


def test_mountpoint_errors(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    sock = memfd_guest.qmp_path
    _one_line_error(run_vmcorefs("mount", sock, str(tmp_path / "missing")), 2, "does not exist")
    f = tmp_path / "plain"
    f.write_text("")
    _one_line_error(run_vmcorefs("mount", sock, str(f)), 2, "not a directory")
    with Mount(memfd_guest) as m:
        # Already mounted (by us); the busy monitor would also refuse, but
        # the mountpoint is checked first.
        _one_line_error(run_vmcorefs("mount", sock, str(m.path)), 2, "already a mount point")


def test_monitor_in_use(memfd_guest: QemuGuest, mnt: Path) -> None:
    with Mount(memfd_guest):
        other = tempfile.mkdtemp()
        try:
            r = run_vmcorefs("mount", memfd_guest.qmp_path, other, timeout=30)
            _one_line_error(r, 1, "already has a client", "within 5 s")
            assert not is_mounted(other)
            # --timeout bounds the wait for the greeting too.
            r = run_vmcorefs("info", "--timeout", "1", memfd_guest.qmp_path, timeout=30)
            _one_line_error(r, 1, "already has a client", "within 1 s")
        finally:
            os.rmdir(other)


@contextlib.contextmanager
def _queue_filled(path: str) -> Iterator[None]:
    """Connections to the unix socket ``path`` until its listener's queue
    is full (EAGAIN), for the ``with`` block: the next client's connect
    finds no room."""
    fillers: list[socket.socket] = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
            assert len(fillers) < 100, "the listener takes every connection"
        yield
    finally:
        for s in fillers:
            s.close()


def _greeted(path: str) -> socket.socket:
    """A client of the QMP monitor at ``path``, once QEMU has greeted it
    (its queue of connections may be full for a while: tried again)."""
    deadline = time.monotonic() + 60
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.settimeout(60)
            s.connect(path)
            assert b'"QMP"' in s.recv(4096)
            return s
        except BlockingIOError:
            s.close()
            assert time.monotonic() < deadline, f"{path}: the queue of connections stays full"
            time.sleep(0.05)
        except BaseException:
            s.close()
            raise


def test_stopped_qemu_is_not_a_busy_monitor(memfd_guest: QemuGuest, mnt: Path) -> None:
    """QMP greets one client per monitor and a stopped QEMU greets none: the
    two silences are told apart by the state of QEMU's process.  A second
    client holding the monitor of a running QEMU: "already has a client";
    QEMU SIGSTOPped: it is stopped, with its pid and how to resume it.  The
    same when QEMU's queue of connections is full (clients already waiting,
    e.g. earlier tries): no connection is taken at all."""
    g = memfd_guest
    holder = _greeted(g.qmp_path)  # the monitor is this client's
    try:
        busy = [run_vmcorefs("info", g.qmp_path, timeout=60)]
        with _queue_filled(g.qmp_path):
            busy.append(run_vmcorefs("info", g.qmp_path, timeout=60))
    finally:
        holder.close()
    # QEMU greets (and drops) the connections queued meanwhile, then ours:
    # its queue is empty again.
    _greeted(g.qmp_path).close()
    _one_line_error(busy[0], 1, f"the monitor of QEMU (pid {g.pid}) did not greet", "already has a client")
    _one_line_error(busy[1], 1, f"the monitor of QEMU (pid {g.pid}) took no connection", "already has a client")
    os.kill(g.pid, signal.SIGSTOP)
    try:
        stopped = [run_vmcorefs("mount", g.qmp_path, str(mnt), timeout=60)]
        with _queue_filled(g.qmp_path):
            stopped.append(run_vmcorefs("info", g.qmp_path, timeout=60))
    finally:
        os.kill(g.pid, signal.SIGCONT)
    for r, silence in zip(stopped, ["no answer to the QMP greeting", "no connection taken"]):
        _one_line_error(r, 1, f"QEMU (pid {g.pid}) is stopped (SIGSTOP): {silence} within 5 s",
                        f"(kill -CONT {g.pid} resumes it)")
        assert "already has a client" not in r.stderr
    assert not is_mounted(mnt)
    # Running again, its monitor takes the next client (once it has dropped
    # the connections it never greeted).
    wait_for(lambda: run_vmcorefs("info", g.qmp_path, timeout=60).returncode == 0, 60, "vmcorefs info after SIGCONT")
    assert g.status() == "running"


@pytest.mark.parametrize("options", [(), ("--freeze",)], ids=["plain", "freeze"])
def test_open_on_stopped_qemu_fails_after_one_timeout(memfd_guest: QemuGuest, options: tuple[str, ...]) -> None:
    """SIGSTOP: an open of vmcore fails with ETIMEDOUT after about one
    --timeout, not one per QMP exchange (the lookup's attribute refresh,
    then the open's snapshot, or its --freeze status check); a later open,
    once QEMU runs again, asks QEMU again and works."""
    g = memfd_guest
    timeout = 5.0
    with Mount(g, "--timeout", f"{timeout:g}", *options) as m:
        assert os.stat(m.vmcore).st_size > 0
        os.kill(g.pid, signal.SIGSTOP)
        try:
            # Older than a second, the layout (and the kernel's attributes)
            # are refreshed by the lookup of the path: a first QMP exchange.
            time.sleep(1.5)
            t = time.monotonic()
            with pytest.raises(OSError) as e:
                os.open(m.vmcore, os.O_RDONLY)
            elapsed = time.monotonic() - t
            assert e.value.errno == errno.ETIMEDOUT
            # It waited for QEMU once (plus at most a 1 s grace): a lower
            # bound a busy host cannot break, and an upper one with 4 s of
            # slack that one wait per QMP exchange (2 timeouts or more) fails.
            assert timeout * 0.9 <= elapsed < timeout * 2, elapsed
        finally:
            os.kill(g.pid, signal.SIGCONT)
        fd = os.open(m.vmcore, os.O_RDONLY)
        try:
            assert len(os.pread(fd, 4096, 0)) == 4096
            if options:
                assert g.status() == "paused"
        finally:
            os.close(fd)
    assert g.status() == "running"


def test_qemu_exit_while_mounted(tmp_path: Path) -> None:
    """Reads fail with EIO promptly; the daemon unmounts and exits 1 with a message."""
    g = QemuGuest(GuestSpec("dying", mib=128)).wait_ready()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon = spawn_vmcorefs("mount", "-f", g.qmp_path, str(mnt), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_mounted(mnt, daemon)
        fd = os.open(mnt / "vmcore", os.O_RDONLY)
        assert len(os.pread(fd, 1 << 20, 1 << 20)) == 1 << 20
        # A second reader streams the whole core with dd, slowly, in a loop.
        streamer = subprocess.Popen(
            ["sh", "-c", f"while dd if={mnt / 'vmcore'} of=/dev/null bs=64k 2>/tmp/dd.err.$$; do :; done;"
                         f" cat /tmp/dd.err.$$; rm -f /tmp/dd.err.$$"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)
        assert streamer.poll() is None
        g.proc.kill()
        g.proc.wait()
        # "Promptly": the daemon notices at once; the bounds only leave room for a busy host.
        killed_at = time.monotonic()
        with pytest.raises(OSError) as e:
            while True:
                os.pread(fd, 1 << 20, 1 << 20)
                assert time.monotonic() - killed_at < 10, "reads still succeed 10 s after QEMU died"
                time.sleep(0.01)
        assert e.value.errno == 5  # EIO
        os.close(fd)
        out, _ = streamer.communicate(timeout=30)
        assert time.monotonic() - killed_at < 15
        assert "Input/output error" in out, out
        _, err = daemon.communicate(timeout=30)
        assert daemon.returncode == 1
        assert "QEMU exited while mounted" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        assert not is_mounted(mnt)
        # The mountpoint is an ordinary empty directory again; nobody is stuck in D state.
        assert os.listdir(mnt) == []
        assert streamer.returncode is not None
    finally:
        if daemon.poll() is None:
            daemon.kill()
        unmount(mnt)
        g.close()


def test_unmount_with_fusermount_exits_zero(memfd_guest: QemuGuest, mnt: Path) -> None:
    daemon = spawn_vmcorefs("mount", "-f", memfd_guest.qmp_path, str(mnt), stderr=subprocess.PIPE)
    wait_mounted(mnt, daemon)
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert daemon.wait(timeout=30) == 0
    # SIGTERM also unmounts cleanly.
    daemon = spawn_vmcorefs("mount", "-f", memfd_guest.qmp_path, str(mnt), stderr=subprocess.PIPE)
    wait_mounted(mnt, daemon)
    daemon.terminate()
    assert daemon.wait(timeout=30) == 0
    assert not is_mounted(mnt)
