"""The tools users run, on the live vmcore: makedumpfile and drgn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmcorefs.testing import DRGN_KALLSYMS, Mount, QemuGuest, makedumpfile, require

pytestmark = pytest.mark.integration

def test_makedumpfile_filtered_dump_of_live_guest(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    out = tmp_path / "dump.kdump"
    with Mount(memfd_guest) as m:
        makedumpfile(m.vmcore, out, "-c", "-d", "31")
        assert out.read_bytes()[:8] == b"KDUMP   "
        # Filtered and compressed: far smaller than guest RAM.
        assert out.stat().st_size < (memfd_guest.mem_mb << 20) // 4
        dmesg = tmp_path / "dmesg.txt"
        makedumpfile(m.vmcore, dmesg, "--dump-dmesg")
        log = dmesg.read_text(errors="replace")
        assert f"Linux version {memfd_guest.release}" in log
        assert "VMCOREFS-TICK" in log


@pytest.mark.parametrize("guest_kind", ["memfd", "private"])
def test_drgn_reads_linux_banner(guest_kind: str, request: pytest.FixtureRequest) -> None:
    """drgn opens the live vmcore and finds linux_banner via VMCOREINFO kallsyms."""
    try:
        import drgn  # noqa: F401
    except ImportError:
        require(False, "drgn not installed")
    g: QemuGuest = request.getfixturevalue(f"{guest_kind}_guest")
    with Mount(g) as m:
        r = subprocess.run([sys.executable, "-c", DRGN_KALLSYMS, str(m.vmcore)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"Linux version {g.release} ")
