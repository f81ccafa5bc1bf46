"""``python -m vmcorefs.testing boot``: which guest it boots (QEMU not run:
a stand-in records the spec and announces the guest at once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmcorefs.testing import BACKPORTS, QEMU10, SYSTEM_QEMU, GuestSpec
from vmcorefs.testing import __main__ as harness
from vmcorefs.testing.guests import READY


class RecordedGuest:
    """What :class:`~vmcorefs.testing.QemuGuest` would have booted."""

    specs: list[GuestSpec] = []

    def __init__(self, spec: GuestSpec, directory: Path, detach: bool = False) -> None:
        RecordedGuest.specs.append(spec)
        self.spec, self.dir = spec, directory
        self.serial = directory / "serial.log"
        self.serial.write_bytes(READY + b" " + spec.kernel.dir.name.encode() + b"\n")

    def wait_ready(self) -> RecordedGuest:
        return self

    def close(self) -> None:
        pass


@pytest.fixture
def booted(monkeypatch: pytest.MonkeyPatch) -> list[GuestSpec]:
    RecordedGuest.specs = []
    monkeypatch.setattr(harness, "QemuGuest", RecordedGuest)
    return RecordedGuest.specs


def test_boot_on_qemu_10(booted: list[GuestSpec], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--qemu 10``: the 6.12 kernel on bookworm-backports' QEMU 10 (its
    binary, its firmware with -L), from the shell as from the tests."""
    assert harness.main(["boot", str(tmp_path / "g"), "--qemu", "10", "--kernel", str(BACKPORTS.dir)]) == 0
    assert capsys.readouterr().out.strip() == f"{READY.decode()} guest-backports"
    (spec,) = booted
    assert spec.qemu == QEMU10 and spec.kernel == BACKPORTS
    assert QEMU10.firmware is not None
    assert spec.command(tmp_path)[:3] == [QEMU10.binary, "-L", str(QEMU10.firmware)]


def test_boot_on_debian_qemu_by_default(booted: list[GuestSpec], tmp_path: Path) -> None:
    assert harness.main(["boot", str(tmp_path / "a")]) == 0
    assert harness.main(["boot", str(tmp_path / "b"), "--qemu", "7.2"]) == 0
    assert [spec.qemu for spec in booted] == [SYSTEM_QEMU, SYSTEM_QEMU]


def test_boot_on_an_unknown_qemu_is_refused(booted: list[GuestSpec], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        harness.main(["boot", str(tmp_path / "g"), "--qemu", "9"])
    assert e.value.code == 2 and "invalid choice: '9'" in capsys.readouterr().err
    assert booted == []
