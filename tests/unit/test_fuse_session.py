"""The mount command's process side without FUSE or QEMU: _FuseSession.terminate
against pyfuse3's race (pyfuse3.terminate() raises InvalidStateError when a
task waiting for /dev/fuse had just been woken; the waiters after it must
still be told), and the daemon's failures before "ready"."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vmcorefs import cli
from vmcorefs.cli import _FuseSession
from vmcorefs.errors import QEMUGoneError


class FakePyfuse3:
    """terminate() fails like pyfuse3's notify_closing on its first ``fail`` calls."""

    def __init__(self, fail: int) -> None:
        self.fail, self.calls = fail, 0

    def terminate(self) -> None:
        self.calls += 1
        if self.calls <= self.fail:
            raise asyncio.InvalidStateError("invalid state")


def _terminate(fail: int) -> int:
    async def main() -> int:
        session = object.__new__(_FuseSession)
        session.pyfuse3 = FakePyfuse3(fail)
        session.session_open = True
        session.terminate()
        for _ in range(5):
            await asyncio.sleep(0)
        return session.pyfuse3.calls

    return asyncio.run(main())


def test_terminate_once_when_pyfuse3_succeeds() -> None:
    assert _terminate(0) == 1


def test_terminate_again_after_invalid_state() -> None:
    assert _terminate(1) == 2
    assert _terminate(2) == 3


def test_terminate_gives_up_after_three_tries() -> None:
    assert _terminate(10) == 3


def test_terminate_without_a_session_leaves_libfuse_alone() -> None:
    """Before pyfuse3.init() or after pyfuse3.close() (a SIGINT handled then
    crashed libfuse on its freed session)."""
    session = object.__new__(_FuseSession)
    session.pyfuse3 = FakePyfuse3(0)
    session.session_open = False
    session.terminate()
    assert session.pyfuse3.calls == 0


def test_daemon_failure_before_ready_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``vmcorefs mount`` (daemon form): a failure in the daemon before the
    mount is ready -- ours or a bug -- reaches the waiting command as one line
    with its exit status, not a bare "daemon exited"."""
    async def serve_fails(args: object, ready: object) -> int:
        raise RuntimeError("boom at 0x1000")

    monkeypatch.setattr(cli, "_serve", serve_fails)
    assert cli.main(["mount", str(tmp_path / "qmp.sock"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["vmcorefs: internal error: RuntimeError: boom at 0x1000"
                                        " (run with --debug -f for details)"], err

    async def serve_gone(args: object, ready: object) -> int:
        raise QEMUGoneError("QEMU has exited")

    monkeypatch.setattr(cli, "_serve", serve_gone)
    assert cli.main(["mount", str(tmp_path / "qmp.sock"), str(tmp_path)]) == QEMUGoneError.exit_code
    assert capsys.readouterr().err.strip().splitlines() == ["vmcorefs: QEMU has exited"]


def test_log_file_that_cannot_be_opened(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--log-file`` in a missing directory: one line naming it, exit 2, no daemon."""
    log_file = tmp_path / "missing" / "vmcorefs.log"
    assert cli.main(["mount", "--log-file", str(log_file), str(tmp_path / "qmp.sock"), str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vmcorefs: --log-file {log_file}: No such file or directory"]
