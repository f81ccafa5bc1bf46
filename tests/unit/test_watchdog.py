"""The --freeze watchdog's protocol without QEMU (vmcorefs.watchdog).

The daemon's side (:class:`WatchedGuest` over a :class:`Watchdog`) writes
its bytes into a real pipe that the test reads; the watchdog's side
(:func:`watch`) reads a real pipe and runs a recording resume action; the
spawned process is a real one (:func:`start`).  Resuming real QEMU and
libvirt is tested in tests/integration/test_watchdog_live.py and test_libvirt.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
from qemu.qmp import EventListener
from qemu.qmp.message import Message

from vmcorefs import watchdog
from vmcorefs.errors import QMPError, QMPTimeoutError
from vmcorefs.watchdog import PAUSED, RESUMED, WatchedGuest, Watchdog, watch


class Guest:
    """A guest whose pause/resume succeed or raise ``fail``; with a monitor whose events the test puts."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: BaseException | None = None
        self.monitor = self
        self.listener: EventListener | None = None

    async def pause(self) -> None:
        self.calls.append("stop")
        if self.fail is not None:
            raise self.fail

    async def resume(self) -> None:
        self.calls.append("cont")

    def listen(self, *names: str) -> Any:
        import contextlib

        @contextlib.contextmanager
        def cm() -> Iterator[EventListener]:
            self.listener = EventListener(names)
            yield self.listener
        return cm()


@pytest.fixture
def pipe() -> Iterator[tuple[int, Watchdog]]:
    """(read end, a Watchdog writing the other end); the process is a real, idle one."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    yield r, Watchdog(proc, w)
    os.close(r)


def watch_words(chunks: list[bytes], argv: list[str], quiet: bool = False) -> int:
    """``watch()`` reading ``chunks`` (one write each, as the daemon does) from a closed pipe."""
    r, w = os.pipe()
    for chunk in chunks:
        os.write(w, chunk)
    os.close(w)
    try:
        return watch(r, argv, quiet=quiet)
    finally:
        os.close(r)


def said(r: int) -> bytes:
    os.set_blocking(r, False)
    try:
        return os.read(r, 64)
    except BlockingIOError:
        return b""


def test_pause_says_p_first_and_resume_r_after(pipe: tuple[int, Watchdog]) -> None:
    r, wd = pipe
    g = Guest()
    wg = WatchedGuest(g, wd)

    async def go() -> None:
        await wg.pause()
        assert said(r) == PAUSED and wg.ours
        await wg.resume()
        assert said(r) == RESUMED and not wg.ours and g.calls == ["stop", "cont"]
    asyncio.run(go())


def test_refused_stop_takes_p_back_but_a_timeout_keeps_it(pipe: tuple[int, Watchdog]) -> None:
    r, wd = pipe
    g = Guest()
    wg = WatchedGuest(g, wd)

    async def go() -> None:
        g.fail = QMPError("refused", "stop")
        with pytest.raises(QMPError):
            await wg.pause()
        assert said(r) == PAUSED + RESUMED and not wg.ours
        g.fail = QMPTimeoutError("no answer within 10 s", "stop")
        with pytest.raises(QMPTimeoutError):
            await wg.pause()
        assert said(r) == PAUSED  # the stop may still happen: the watchdog checks the status
    asyncio.run(go())


def test_cancelled_stop_keeps_p_and_is_ours_to_undo(pipe: tuple[int, Watchdog]) -> None:
    """A signal cancels the pause after the stop went out: QEMU may have
    done it, so the watchdog keeps ``P`` and a resume sends ``cont``."""
    r, wd = pipe
    g = Guest()
    wg = WatchedGuest(g, wd)

    async def go() -> None:
        g.fail = asyncio.CancelledError()
        with pytest.raises(asyncio.CancelledError):
            await wg.pause()
        assert said(r) == PAUSED and wg.ours
        await wg.resume()
        assert said(r) == RESUMED and not wg.ours and g.calls == ["stop", "cont"]
    asyncio.run(go())


def test_someone_elses_resume_ends_our_pause(pipe: tuple[int, Watchdog]) -> None:
    r, wd = pipe
    g = Guest()
    wg = WatchedGuest(g, wd)

    async def go() -> None:
        task = asyncio.create_task(wg.follow_events())
        await asyncio.sleep(0)
        assert g.listener is not None
        await g.listener.put(Message({"event": "RESUME", "data": {}}))  # before our stop: not news
        await wg.pause()
        await asyncio.sleep(0.01)
        assert said(r) == PAUSED and wg.ours
        await g.listener.put(Message({"event": "RESUME", "data": {}}))
        await asyncio.sleep(0.01)
        assert said(r) == RESUMED and not wg.ours
        await wg.resume()  # the last close: not our pause any more, no cont
        assert g.calls == ["stop"]
        task.cancel()
    asyncio.run(go())


@pytest.mark.parametrize("words, resumed", [(b"", False), (b"P", True), (b"PR", False), (b"PRP", True),
                                            (b"PRPR", False)])
def test_watch_resumes_only_after_a_last_p(words: bytes, resumed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []

    def record(*args: str) -> str:
        calls.append(args)
        return "recorded"

    monkeypatch.setitem(watchdog.RESUMERS, "test", record)
    assert watch_words([bytes([byte]) for byte in words], ["test", "a", "b"]) == 0
    assert calls == ([("a", "b")] if resumed else [])


def _ignores(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask & (1 << (sig - 1)))


def test_spawned_watchdog_exits_at_eof_in_its_own_session() -> None:
    wd = watchdog.start(["qmp", "/nonexistent/qmp.sock"])
    try:
        assert os.getsid(wd.pid) == wd.pid != os.getsid(0)
        # The pipe of Popen closes within execve, before the kernel has set the new command line.
        deadline = time.monotonic() + 60
        argv = [b""]
        while argv == [b""] and time.monotonic() < deadline:
            with open(f"/proc/{wd.pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        assert b"-I" in argv and argv[2].endswith(b"vmcorefs/watchdog.py")
        # Once it ignores SIGTERM (a stop of the daemon's whole service), SIGTERM leaves it running.
        deadline = time.monotonic() + 60
        while not _ignores(wd.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(wd.pid, signal.SIGTERM)
    finally:
        wd.paused()  # QEMU is "gone" (no socket): nothing to resume, a clean exit
        wd.close()
    deadline = time.monotonic() + 60
    while wd.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert wd.proc.returncode == 0


@pytest.mark.parametrize("done", [False, True])
def test_watch_removes_named_files_unless_done(done: bool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Files named by F...NUL (split across writes as a pipe may deliver
    them) are removed after the resume when the writer dies, kept when it
    said D (it cleaned up by itself)."""
    calls: list[tuple[str, ...]] = []
    monkeypatch.setitem(watchdog.RESUMERS, "test", lambda *a: calls.append(a) or "guest resumed (cont)")
    files = [tmp_path / ".vm.elf.x.vmcorefs-partial", tmp_path / "name with\nnewline"]
    for f in files:
        f.write_bytes(b"partial")
    words = b"P" + b"".join(watchdog.REMOVE + os.fsencode(f) + b"\0" for f in files) + (b"D" if done else b"")
    assert watch_words([words[pos:pos + 7] for pos in range(0, len(words), 7)], ["test", "sock"], quiet=True) == 0
    assert calls == [("sock",)]
    assert [f.exists() for f in files] == [done, done]
    err = capsys.readouterr().err
    assert err.count("vmcorefs watchdog:") == 1 and "guest resumed (cont)" in err
    assert all((f"removed {f}" in err) is not done for f in files), err


@pytest.mark.parametrize(("outcome", "quiet", "says"), [
    ("QEMU is gone (nothing to resume)", True, False),
    ("guest left shutdown (not paused)", True, False),
    ("QEMU is gone (nothing to resume)", False, True),
    ("guest resumed (cont)", True, True),
])
def test_quiet_watch_says_nothing_when_nothing_was_done(outcome: str, quiet: bool, says: bool,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(watchdog.RESUMERS, "test", lambda *a: outcome)
    assert watch_words([PAUSED], ["test"], quiet=quiet) == 0
    err = capsys.readouterr().err
    assert (outcome in err) is says and err.count("\n") == int(says)


def test_quiet_still_says_a_failed_resume(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(*_a: str) -> str:
        raise TimeoutError("QEMU did not answer")

    monkeypatch.setitem(watchdog.RESUMERS, "test", fail)
    assert watch_words([PAUSED], ["test"], quiet=True) == 1
    assert "cannot resume it: QEMU did not answer" in capsys.readouterr().err


class _Lazy:
    """A LazyGuest of ``guest`` (what ``mount --all`` keeps per domain)."""

    name = "dom"

    def __init__(self, guest: Guest) -> None:
        self.guest = guest

    async def get(self) -> Guest:
        return self.guest

    async def status(self) -> str:
        return "running"

    async def pause(self) -> None:
        await self.guest.pause()

    async def resume(self) -> None:
        await self.guest.resume()

    async def close(self) -> None:
        self.guest.calls.append("close")


def test_all_freeze_starts_a_domain_watchdog_at_its_first_pause(pipe: tuple[int, Watchdog],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """mount --all --freeze: no watchdog for a domain until it is first
    paused; then one, told of each pause and resume, let go at close."""
    from vmcorefs.qemu.domains import FreezeWatchedGuest

    r, wd = pipe
    g = Guest()
    started: list[list[str]] = []
    monkeypatch.setattr(watchdog, "action_for", lambda monitor: ["libvirt", "URI", "UUID"])
    monkeypatch.setattr(watchdog, "start", lambda action: started.append(list(action)) or wd)
    fw = FreezeWatchedGuest(_Lazy(g))  # type: ignore[arg-type]

    async def go() -> None:
        assert await fw.status() == "running" and started == []
        await fw.pause()
        assert started == [["libvirt", "URI", "UUID"]] and said(r) == PAUSED
        await fw.resume()
        assert said(r) == RESUMED
        await fw.pause()
        await fw.resume()
        assert said(r) == PAUSED + RESUMED and len(started) == 1
        await fw.close()
        assert g.calls == ["stop", "cont", "stop", "cont", "close"]
    asyncio.run(go())


def test_all_freeze_pauses_without_a_watchdog_it_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmcorefs.qemu.domains import FreezeWatchedGuest

    def refuse(action: list[str]) -> Watchdog:
        raise OSError("no process")

    g = Guest()
    monkeypatch.setattr(watchdog, "action_for", lambda monitor: ["libvirt", "URI", "UUID"])
    monkeypatch.setattr(watchdog, "start", refuse)
    fw = FreezeWatchedGuest(_Lazy(g))  # type: ignore[arg-type]

    async def go() -> None:
        await fw.pause()
        await fw.resume()
        await fw.close()
        assert g.calls == ["stop", "cont", "close"] and fw.watched is None
    asyncio.run(go())


def test_qmp_action_names_the_socket_absolutely(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The watchdog runs in /: a QMP socket given relative to the user's
    directory (``vmcorefs dump g/qmp.sock ...``) is passed to it absolute."""
    from vmcorefs.qemu.monitor import Monitor

    monitor = object.__new__(Monitor)
    monitor.path = "g/qmp.sock"
    monkeypatch.chdir(tmp_path)
    assert watchdog.action_for(monitor) == ["qmp", str(tmp_path / "g" / "qmp.sock")]
