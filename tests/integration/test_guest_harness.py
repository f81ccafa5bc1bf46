"""The test guests' own harness (vmcorefs.testing.guests) on a real QEMU:
a first boot that hangs is restarted once, then fails with the serial log."""

from __future__ import annotations

import pytest

from vmcorefs.testing import GuestSpec, QemuGuest

pytestmark = pytest.mark.integration


def test_a_hung_first_boot_is_restarted_once_then_fails(capfd: pytest.CaptureFixture[str]) -> None:
    # -S: QEMU never starts the vCPUs (both stay at the reset vector), so /init never announces itself;
    # 8 s leave a busy host time to start QEMU and its monitor (where the vCPUs are read).
    g = QemuGuest(GuestSpec("hung", mib=64, extra=("-S",), boot_timeout=8))
    first = g.pid
    try:
        with pytest.raises(TimeoutError, match="guest hung did not boot in 8 s"):
            g.wait_ready()
        assert g.restarts == 1 and g.pid != first
        assert (g.dir / "serial-hung1.log").exists()
        err = capfd.readouterr().err
        assert "guest hung: first boot hung, restarting it once (vCPUs at EIP=0000fff0 EIP=0000fff0)" in err
    finally:
        g.close()
