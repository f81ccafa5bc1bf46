"""Session fixtures: two booted guests shared by the integration tests.

``memfd_guest`` uses ``memory-backend-memfd,share=on`` (served by pread on
the memfd), ``private_guest`` QEMU's default private RAM (served through
/proc/PID/mem).  Each boots once per session (about 4 s under TCG).  Guests
and mounts come from :mod:`vmcorefs.testing` (shared with the benchmarks and
the demo).
"""

from __future__ import annotations

import os
import shutil
from typing import Iterator

import pytest

from vmcorefs.testing import BACKPORTS, QEMU10, GuestSpec, QemuGuest, close_all, require

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session", autouse=True)
def _fuse_available() -> Iterator[None]:
    require(os.path.exists("/dev/fuse"), "/dev/fuse missing")
    require(shutil.which("fusermount3") is not None, "fusermount3 (fuse3) not installed")
    yield
    close_all()  # whatever a failed test left behind


def _boot(spec: GuestSpec) -> Iterator[QemuGuest]:
    with QemuGuest(spec) as g:
        yield g


@pytest.fixture(scope="session")
def memfd_guest() -> Iterator[QemuGuest]:
    yield from _boot(GuestSpec("memfd", memory="memfd"))


@pytest.fixture(scope="session")
def private_guest() -> Iterator[QemuGuest]:
    yield from _boot(GuestSpec("private", memory="private"))


@pytest.fixture(scope="session")
def qemu10_memfd_guest() -> Iterator[QemuGuest]:
    """bookworm-backports' 6.12 on QEMU 10 (``scripts/build-tools.sh``), shared memfd RAM."""
    yield from _boot(GuestSpec("q10-memfd", qemu=QEMU10, kernel=BACKPORTS, memory="memfd"))


@pytest.fixture(scope="session")
def qemu10_private_guest() -> Iterator[QemuGuest]:
    """bookworm-backports' 6.12 on QEMU 10, QEMU's private RAM."""
    yield from _boot(GuestSpec("q10-private", qemu=QEMU10, kernel=BACKPORTS, memory="private"))


@pytest.fixture(params=["memfd", "private"])
def guest(request: pytest.FixtureRequest) -> QemuGuest:
    """Each test using this runs against both memory kinds."""
    return request.getfixturevalue(f"{request.param}_guest")  # type: ignore[no-any-return]
