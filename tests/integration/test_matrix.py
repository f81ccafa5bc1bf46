"""The matrix the suite keeps working: crash 9, drgn, gdb and makedumpfile
on the live vmcore of each guest kernel -- Debian 12's 6.1 and Debian 11's
5.10 on Debian 12's QEMU 7.2, bookworm-backports' 6.12 on QEMU 10.

Debian 12's own crash (8.0.2) is tested in test_debug_tools.py, on what it
can read; the byte-identity tests of test_vmcore.py run on both QEMUs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from vmcorefs.core.vmcoreinfo import parse_fields
from vmcorefs.dump import check_filter, makedumpfile_args
from vmcorefs.errors import UsageError
from vmcorefs.testing import (
    CRASH9,
    DEBIAN11,
    KERNEL_SPACE,
    GuestSpec,
    KernelAssets,
    Mount,
    QemuGuest,
    crash_sections,
    drgn_tasks,
    gdb_on_kcore,
    gdb_threads,
    makedumpfile,
    require,
    run_crash,
)

pytestmark = pytest.mark.integration

#: The guest of each kernel: a fixture of conftest.py where the suite has one.
MATRIX: dict[str, GuestSpec | str] = {
    "5.10": GuestSpec("m510", kernel=DEBIAN11),  # on Debian 12's QEMU 7.2
    "6.1": "memfd_guest",  # on Debian 12's QEMU 7.2
    "6.12": "qemu10_memfd_guest",  # on QEMU 10
}
#: What crash runs on every core; each prints the same for the same memory.
CRASH_COMMANDS = "sys\nps\nbt -a\nlog\nkmem -i\nfiles 1"


@pytest.fixture(scope="module", params=list(MATRIX))
def kguest(request: pytest.FixtureRequest) -> Iterator[QemuGuest]:
    """A booted guest of each kernel of the matrix (with its debug vmlinux)."""
    spec = MATRIX[request.param]
    if isinstance(spec, str):
        g: QemuGuest = request.getfixturevalue(spec)
        _require_vmlinux(g.spec.kernel)
        yield g
        return
    _require_vmlinux(spec.kernel)
    with QemuGuest(spec) as g:
        yield g


def _require_vmlinux(kernel: KernelAssets) -> None:
    require(kernel.vmlinux.exists(), f"debug vmlinux missing ({kernel.vmlinux}); run scripts/setup.sh")


def _vmlinux(g: QemuGuest) -> Path:
    return g.spec.kernel.vmlinux


def _crash9(g: QemuGuest, core: Path) -> str:
    require(CRASH9.exists(), f"crash 9 missing ({CRASH9}); run scripts/build-tools.sh crash")
    return run_crash(_vmlinux(g), core, CRASH_COMMANDS, crash=CRASH9, echo=True)


def _ps_tasks(ps: str) -> int:
    """Tasks listed by crash's ``ps`` (one line each, ``>`` marks those on a CPU)."""
    return len(re.findall(r"^[ >]\s*\d+\s+\d+\s+\d+\s+[0-9a-f]+\s+[A-Z]{2}\s", ps, re.M))


@pytest.mark.parametrize("freeze", [False, True], ids=["running", "freeze"])
def test_crash9_on_live_vmcore(kguest: QemuGuest, freeze: bool) -> None:
    """crash 9 reads every kernel of the matrix from the live vmcore: the
    system, every task (as many as drgn counts on the same mount), an
    unwind of each vCPU, the log, memory usage and init's open files."""
    with Mount(kguest, *(["--freeze"] if freeze else [])) as m:
        out = _crash9(kguest, m.vmcore)
        drgn = drgn_tasks(m.vmcore, _vmlinux(kguest))
    s = crash_sections(out)
    assert set(s) == {*CRASH_COMMANDS.splitlines(), "quit"}, out[:3000]
    assert re.search(rf"^\s+RELEASE: {re.escape(kguest.release)}$", s["sys"], re.M), s["sys"]
    assert "invalid size request" not in out, out[-3000:]
    if freeze:  # running, a stack may change under crash's reads of it
        assert "read error" not in out, out[-3000:]
    # Two opens (crash's, drgn's) are two instants: a kworker may come or go.
    tasks = _ps_tasks(s["ps"])
    assert tasks > 10 and abs(tasks - drgn.tasks) <= 3, (tasks, drgn.tasks, s["ps"])
    assert re.search(r"^\s+2\s+0\s+\d+\s+[0-9a-f]+\s+[A-Z]{2}\s.*\[kthreadd\]$", s["ps"], re.M), s["ps"]
    _assert_every_vcpu_unwinds(s["bt -a"], kguest.spec.vcpus)
    assert f"Linux version {kguest.release}" in s["log"] and "VMCOREFS-TICK" in s["log"]
    total = re.search(r"^\s*TOTAL MEM\s+(\d+)\s+(\S+ [KMG]B)", s["kmem -i"], re.M)
    assert total and 0 < int(total[1]) <= kguest.spec.mib << 8, s["kmem -i"]  # pages of 4 KiB
    assert re.search(r"^PID: 1\s+TASK: [0-9a-f]+\s+CPU: \d+\s+COMMAND: ", s["files 1"], re.M), s["files 1"]
    assert re.search(r"^ROOT: /", s["files 1"], re.M), s["files 1"]


def _assert_every_vcpu_unwinds(bt: str, vcpus: int) -> None:
    """``bt -a``: one block per vCPU, each with at least one frame."""
    blocks = re.split(r"^(?=PID: )", bt, flags=re.M)[1:]
    cpus = [int(re.search(r"CPU: (\d+)", b)[1]) for b in blocks]  # type: ignore[index]
    assert sorted(cpus) == list(range(vcpus)), bt
    for b in blocks:
        assert re.search(r"^\s*#0 ", b, re.M), b


def test_crash9_same_output_as_on_qemu_dump(kguest: QemuGuest, tmp_path: Path) -> None:
    """Guest paused: crash 9 prints the same on our vmcore as on QEMU's own
    dump-guest-memory of the same instant, for every command."""
    with kguest.paused(), Mount(kguest) as m:
        ours = _crash9(kguest, m.vmcore)
        theirs = _crash9(kguest, kguest.dump(tmp_path / "qemu.dump"))

    def normal(text: str) -> list[str]:
        return [line for line in text.splitlines() if "DUMPFILE:" not in line]

    assert normal(ours) == normal(theirs)


NEW_KERNELS = pytest.mark.parametrize("kguest", ["5.10", "6.12"], indirect=True)


@NEW_KERNELS
def test_drgn_with_debuginfo(kguest: QemuGuest) -> None:
    """Frozen: drgn lists the tasks and unwinds the task on each vCPU;
    an idle vCPU all the way down to the boot code."""
    with Mount(kguest, "--freeze") as m:
        d = drgn_tasks(m.vmcore, _vmlinux(kguest))
    assert d.release == kguest.release
    assert d.tasks > 10 and d.tasks == d.threads, d
    assert sorted(c.cpu for c in d.on_cpu) == list(range(kguest.spec.vcpus)), d
    for c in d.on_cpu:
        assert c.frames >= 1, d
        if c.comm.startswith("swapper/"):
            # secondary_startup_64 became common_startup_64 in Linux 6.9.
            assert c.frames >= 3 and c.outermost in ("secondary_startup_64", "common_startup_64"), d


@NEW_KERNELS
def test_gdb_on_kcore(kguest: QemuGuest) -> None:
    with Mount(kguest, "--freeze") as m:
        out = gdb_on_kcore(_vmlinux(kguest), m.path, "print linux_banner", "info threads")
    assert f'"Linux version {kguest.release} ' in out, out
    threads = gdb_threads(out)
    assert [n for n, _, _ in threads] == list(range(1, kguest.spec.vcpus + 1)), out
    kernel = [fn for _, pc, fn in threads if pc is None or pc >= KERNEL_SPACE]
    assert kernel and all(fn != "??" for fn in kernel), out


@NEW_KERNELS
def test_makedumpfile_then_crash9(kguest: QemuGuest, tmp_path: Path) -> None:
    """makedumpfile -d 31 of the live vmcore, then crash 9 on the kdump file;
    -d 23 where ``vmcorefs dump`` would refuse 31: Debian 12's makedumpfile
    drops some of Linux 6.10+'s slab pages as user pages (crash 9 then stopped
    silently at start-up, reading the pid xarray).  Under --freeze: one
    instant."""
    out = tmp_path / "filtered.kdump"
    with Mount(kguest, "--freeze") as m:
        level = 31
        try:
            check_filter(makedumpfile_args("kdump-zlib", level), level,
                         parse_fields((m.path / "vmcoreinfo").read_text()))
        except UsageError:
            level = 23
        makedumpfile(m.vmcore, out, "-c", "-d", str(level))
    assert out.read_bytes()[:8] == b"KDUMP   "
    assert out.stat().st_size < (kguest.spec.mib << 20) // 4
    require(CRASH9.exists(), f"crash 9 missing ({CRASH9}); run scripts/build-tools.sh crash")
    text = run_crash(_vmlinux(kguest), out, "sys\nlog", crash=CRASH9)
    assert f"RELEASE: {kguest.release}" in text
    assert "VMCOREFS-TICK" in text
