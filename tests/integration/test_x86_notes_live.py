"""Notes built from ``info registers -a`` (qemu/registers.py) on live guests.

Paused guests of QEMU 7.2 and 10.0: the notes vmcorefs builds through its
QMP monitor equal those of QEMU's own 1-byte ``dump-guest-memory`` byte for
byte, except ``kernel_gs_base`` of a vCPU in user mode (not printed by
``info registers``; see core/x86_notes.py).  Then QEMU's full dump with its
PT_NOTE replaced by ours is read by drgn (tasks, on-CPU stacks) and crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from elftools.elf.elffile import ELFFile

from vmcorefs.core.notes import parse_notes
from vmcorefs.core.x86_notes import QEMUCPUState, X86VCPU, build_x86_notes
from vmcorefs.qemu.monitor import connect
from vmcorefs.qemu.registers import read_x86_vcpus, uses_tcg, x86_notes
from vmcorefs.testing import (BUSY_LOOP, DEBIAN11, DEBIAN12, KERNEL_SPACE, QEMU10, SYSTEM_QEMU, GuestSpec,
                              KernelAssets, Qemu, QemuGuest, drgn_tasks, pause_with_a_user_vcpu, require)

pytestmark = pytest.mark.integration
QEMUS = {"qemu7.2": SYSTEM_QEMU, "qemu10.0": QEMU10}


@contextlib.contextmanager
def busy_guest(name: str, qemu: Qemu, kernel: KernelAssets) -> Iterator[QemuGuest]:
    """A 2-vCPU test guest whose shell runs a busy loop, so that a vCPU is
    often in user mode."""
    with QemuGuest(GuestSpec(name, qemu=qemu, kernel=kernel, console=True)) as g:
        g.send_console(BUSY_LOOP)
        yield g


@contextlib.contextmanager
def paused_with_a_user_vcpu(g: QemuGuest) -> Iterator[None]:
    """The guest paused at an instant with one vCPU in user mode and one in
    the kernel (tries for up to ~30 s); resumed after."""
    pause_with_a_user_vcpu(g)
    try:
        yield
    finally:
        g.qmp("cont")


@pytest.fixture(scope="module", params=list(QEMUS))
def guest(request: pytest.FixtureRequest) -> Iterator[QemuGuest]:
    qemu: Qemu = QEMUS[request.param]
    require(qemu.missing() is None, f"{request.param}: {qemu.missing()} (run scripts/build-tools.sh qemu)")
    require(DEBIAN12.missing() is None, DEBIAN12.missing() or "")
    with busy_guest(f"x86notes-{request.param}", qemu, DEBIAN12) as g:
        yield g


def ours(g: QemuGuest, vmcoreinfo: bytes | None) -> tuple[bytes, list[X86VCPU], bool, float]:
    """Our notes through vmcorefs' own monitor: (notes, vCPUs, tcg, seconds
    for the info registers round trip)."""
    async def run() -> tuple[bytes, list[X86VCPU], bool, float]:
        monitor = await connect(g.qmp_path)
        try:
            t0 = time.perf_counter()
            cpus = await read_x86_vcpus(monitor)
            seconds = time.perf_counter() - t0
            tcg = await uses_tcg(monitor)
            notes = await x86_notes(monitor, vmcoreinfo, tcg=tcg)
            return notes, cpus, tcg, seconds
        finally:
            await monitor.close()
    return asyncio.run(run())


def pt_note(path: Path) -> tuple[int, bytes]:
    """(file offset, bytes) of a dump's PT_NOTE."""
    with open(path, "rb") as f:
        (seg,) = [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_NOTE"]
        return seg["p_offset"], seg.data()


def qemus_notes(g: QemuGuest, tmp: Path) -> bytes:
    """QEMU's notes: a 1-byte dump (the first RAM byte) of the paused guest."""
    g.qmp("dump-guest-memory", paging=False, protocol=f"file:{tmp}", begin=0, length=1)
    return pt_note(tmp)[1]


def without_kernel_gs_base(notes: bytes) -> bytes:
    """PT_NOTE bytes with the kernel_gs_base of every QEMU note set to 0."""
    out, pos = bytearray(notes), 0
    while pos + 12 <= len(out):
        namesz, descsz, _ = struct.unpack_from("<III", out, pos)
        desc = pos + 12 + (namesz + 3) // 4 * 4
        if out[pos + 12:pos + 17] == b"QEMU\0":
            out[desc + 432:desc + 440] = bytes(8)
        pos = desc + (descsz + 3) // 4 * 4
    return bytes(out)


def check_equal(mine: bytes, theirs: bytes, cpus: list[X86VCPU]) -> None:
    """Byte for byte, kernel_gs_base of user-mode vCPUs aside (asserted apart)."""
    assert mine == without_kernel_gs_base(theirs)
    theirs_notes = parse_notes(theirs)
    kgs = [QEMUCPUState.unpack(n.desc).kernel_gs_base for n in theirs_notes if n.name == "QEMU"]
    vmcoreinfo = [n.desc for n in theirs_notes if n.name == "VMCOREINFO"]
    assert len(kgs) == len(cpus) == 2 and vmcoreinfo
    assert build_x86_notes(cpus, vmcoreinfo[0], kernel_gs_base=kgs) == theirs
    for cpu, value in zip(cpus, kgs):
        # A Linux vCPU in the kernel holds the user GS base (0 here), one in
        # user mode the kernel's per-CPU base, which info registers omits.
        assert value == 0 if cpu.cpl == 0 else value >= KERNEL_SPACE


def test_notes_equal_qemus_on_a_paused_guest(guest: QemuGuest, tmp_path: Path) -> None:
    """Five pauses (one vCPU in user mode each time), each compared with
    QEMU's own notes of the same instant."""
    for i in range(5):
        with paused_with_a_user_vcpu(guest):
            theirs = qemus_notes(guest, tmp_path / f"onebyte-{i}.elf")
            vmcoreinfo = [n.desc for n in parse_notes(theirs) if n.name == "VMCOREINFO"][0]
            mine, cpus, tcg, seconds = ours(guest, vmcoreinfo)
        assert tcg
        assert sorted(c.cpl for c in cpus) == [0, 3]
        check_equal(mine, theirs, cpus)
        assert mine != theirs  # the user-mode vCPU's kernel_gs_base
        print(f"{guest.spec.name}: info registers -a round trip {seconds * 1000:.1f} ms")
    assert vmcoreinfo.startswith(b"OSRELEASE=" + guest.release.encode())


def dump_and_ours(g: QemuGuest, tmp: Path) -> tuple[Path, Path, list[X86VCPU]]:
    """QEMU's full dump of the guest paused with a vCPU in user mode, and a
    copy whose PT_NOTE is ours (kernel_gs_base 0: what vmcorefs serves)."""
    theirs_dump, ours_dump = tmp / "qemu.dump", tmp / "ours.dump"
    with paused_with_a_user_vcpu(g):
        g.dump(theirs_dump)
        offset, theirs = pt_note(theirs_dump)
        vmcoreinfo = [n.desc for n in parse_notes(theirs) if n.name == "VMCOREINFO"][0]
        mine, cpus, _, _ = ours(g, vmcoreinfo)
    check_equal(mine, theirs, cpus)
    shutil.copyfile(theirs_dump, ours_dump)
    with open(ours_dump, "r+b") as f:
        f.seek(offset)
        f.write(mine)
    assert pt_note(ours_dump)[1] == mine != theirs
    return theirs_dump, ours_dump, cpus


def test_drgn_reads_a_dump_with_our_notes(guest: QemuGuest, tmp_path: Path) -> None:
    """drgn lists the tasks and unwinds both on-CPU tasks from our notes --
    the same output as from QEMU's own notes."""
    vmlinux = DEBIAN12.vmlinux
    require(vmlinux.exists(), f"debug vmlinux missing ({vmlinux}); run scripts/build-guest.sh --dbg")
    theirs_dump, ours_dump, cpus = dump_and_ours(guest, tmp_path)
    ours = drgn_tasks(ours_dump, vmlinux)
    assert ours == drgn_tasks(theirs_dump, vmlinux)
    assert ours.tasks > 10 and len(ours.on_cpu) == 2, ours
    for c, regs in zip(ours.on_cpu, cpus):
        assert c.cpu == regs.cpu_index and c.pc == regs.regs["rip"], ours  # from our prstatus
        if regs.cpl == 3:  # the busy shell: one user-space frame
            assert c.comm == "sh" and f"#0  {c.pc:#x}\n" in c.trace, ours
        else:  # a kernel task: symbolised frames down to the start of its stack
            assert c.frames >= 3 and re.search(r"^#0  [a-z_]\w* \(", c.trace, re.M), ours


def test_crash_reads_a_dump_with_our_notes(tmp_path: Path) -> None:
    """crash 8.0.2 (Debian 12) with the 5.10 guest, which it understands,
    prints the same for our notes as for QEMU's own (our user-mode vCPU's
    kernel_gs_base is 0, QEMU's is not): ps marks the busy shell active on
    its vCPU, bt unwinds a sleeping task.  crash 8.0.2 cannot unwind the
    on-CPU tasks of any QEMU dump (it fails reading the exception stacks,
    "read of stack at fffffe..."), on QEMU's own notes as on ours."""
    require(shutil.which("crash") is not None, "crash not installed")
    require(DEBIAN11.vmlinux.exists(), f"Debian 11 guest missing ({DEBIAN11.dir}); run scripts/build-guest.sh --old")
    with busy_guest("x86notes-crash", SYSTEM_QEMU, DEBIAN11) as g:
        theirs_dump, ours_dump, cpus = dump_and_ours(g, tmp_path)
    user_cpu = next(c.cpu_index for c in cpus if c.cpl == 3)
    commands = f"sys\nps\nbt -a\nbt -c {user_cpu}\nbt 2\nquit\n"
    outputs = []
    for dump in (ours_dump, theirs_dump):
        r = subprocess.run(["crash", "-s", str(DEBIAN11.vmlinux), str(dump)], input=commands,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        outputs.append([line for line in (r.stdout + r.stderr).splitlines() if "DUMPFILE" not in line])
    assert outputs[0] == outputs[1]
    out = "\n".join(outputs[0])
    assert f"RELEASE: {DEBIAN11.release}" in out
    assert re.search(rf"^>\s+\d+\s+\d+\s+{user_cpu}\s+[0-9a-f]+\s+RU\s.*\ssh$", out, re.M), out
    assert re.search(rf'^PID: \d+\s+TASK: [0-9a-f]+\s+CPU: {user_cpu}\s+COMMAND: "sh"$', out, re.M), out
    assert re.search(r"PID: 2 .*\n #0 \[[0-9a-f]+\] __schedule at", out), out
