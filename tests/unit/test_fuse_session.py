"""cli._FuseSession.terminate against pyfuse3's race (no FUSE, no QEMU):
pyfuse3.terminate() raises InvalidStateError when a task waiting for
/dev/fuse had just been woken; the waiters after it must still be told."""

from __future__ import annotations

import asyncio

from vmcorefs.cli import _FuseSession


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
