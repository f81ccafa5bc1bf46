"""An arm64 guest (qemu-system-aarch64 -M virt, TCG, -cpu max and -cpu cortex-a57) analysed from this x86-64 host.

One guest per session for every test (:data:`~vmcorefs.testing.guests.ARM64_SPEC`:
-cpu max with cheap pointer authentication, 2 vCPUs, 512 MiB as a memfd node and a
private-RAM node; about 3 s to boot under TCG on an idle 2-core host, 12-17 s on a
loaded one), and a second one on ``-cpu cortex-a57`` (ARMv8.0: no pointer
authentication, no SVE; :data:`~vmcorefs.testing.guests.ARM64_A57_SPEC`, same
memory; it boots as fast: both 4.7 s at a load average of 8-11) for the tests whose
result depends on the CPU model only: the byte-identity of ``vmcore`` with
QEMU's dump (its notes differ) and ``kcore`` (the page tables the kernel
builds for that CPU), with gdb-multiarch.  The oracle is QEMU's own
``dump-guest-memory`` of the paused guest; the tools are drgn (debug
vmlinux), gdb-multiarch on ``kcore`` and, when built, crash for ARM64.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from elftools.elf.elffile import ELFFile

from vmcorefs.core.notes import parse_notes
from vmcorefs.testing import Mount, QemuGuest, drgn_tasks, require, run_crash, run_vmcorefs, vmcoreinfo_dict
from vmcorefs.testing.guests import ARM64, ARM64_A57_SPEC, ARM64_SPEC, CACHE

pytestmark = pytest.mark.integration
CHUNK = 1 << 20
EM_AARCH64 = 183
NT_ARM_SVE = 0x405
#: crash built for ARM64 by ``scripts/build-tools.sh crash-arm64``.
CRASH_ARM64 = CACHE / "crash-9-arm64" / "bin" / "crash"


@pytest.fixture(scope="module")
def arm64_guest() -> Iterator[QemuGuest]:
    with QemuGuest(ARM64_SPEC) as g:
        print(f"arm64 guest booted in {g.boot_s:.1f} s")
        yield g


@pytest.fixture(scope="module")
def arm64_a57_guest() -> Iterator[QemuGuest]:
    with QemuGuest(ARM64_A57_SPEC) as g:
        print(f"arm64 cortex-a57 guest booted in {g.boot_s:.1f} s")
        yield g


@pytest.fixture(params=["max", "cortex-a57"])
def arm64_cpu_guest(request: pytest.FixtureRequest) -> QemuGuest:
    """The -cpu max guest, then the -cpu cortex-a57 one."""
    name = "arm64_guest" if request.param == "max" else "arm64_a57_guest"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def arm64_vmlinux() -> Path:
    require(ARM64.vmlinux.exists(), f"no {ARM64.vmlinux}: run scripts/build-guest.sh --arm64")
    return ARM64.vmlinux


def _segments(elf: ELFFile, kind: str) -> list[dict[str, int]]:
    return [dict(s.header) for s in elf.iter_segments() if s["p_type"] == kind]


def _read(f, offset: int, size: int) -> bytes:  # type: ignore[no-untyped-def]
    f.seek(offset)
    return bytes(f.read(size))


def _assert_same_core(ours_path: Path, theirs_path: Path, sve: bool = True) -> None:
    """EM_AARCH64; the PT_LOADs (RAM from 1 GiB: the memfd node, then the
    private one), the notes (NT_PRSTATUS, NT_FPREGSET and, with ``sve``,
    NT_ARM_SVE per vCPU; VMCOREINFO) and every PT_LOAD byte of ``ours_path``
    equal QEMU's dump."""
    with open(ours_path, "rb") as ours, open(theirs_path, "rb") as theirs:
        e_ours, e_theirs = ELFFile(ours), ELFFile(theirs)
        assert e_ours["e_machine"] == e_theirs["e_machine"] == "EM_AARCH64"
        assert e_ours.elfclass == 64 and e_ours["e_type"] == "ET_CORE"
        loads, their_loads = _segments(e_ours, "PT_LOAD"), _segments(e_theirs, "PT_LOAD")
        assert [(s["p_paddr"], s["p_memsz"]) for s in loads] == [(0x4000_0000, 256 << 20), (0x5000_0000, 256 << 20)]
        assert [(s["p_paddr"], s["p_vaddr"], s["p_memsz"]) for s in loads] == \
            [(s["p_paddr"], s["p_vaddr"], s["p_memsz"]) for s in their_loads]
        (note,), (their_note,) = _segments(e_ours, "PT_NOTE"), _segments(e_theirs, "PT_NOTE")
        notes = _read(ours, note["p_offset"], note["p_filesz"])
        assert notes == _read(theirs, their_note["p_offset"], their_note["p_filesz"])
        kinds = [(n.name, n.type) for n in parse_notes(notes)]
        assert kinds.count(("CORE", 1)) == 2 and kinds.count(("CORE", 2)) == 2 and ("VMCOREINFO", 0) in kinds
        assert kinds.count(("LINUX", NT_ARM_SVE)) == (2 if sve else 0), kinds
        mismatches = []
        for a, b in zip(loads, their_loads):
            for done in range(0, a["p_memsz"], CHUNK):
                n = min(CHUNK, a["p_memsz"] - done)
                if _read(ours, a["p_offset"] + done, n) != _read(theirs, b["p_offset"] + done, n):
                    mismatches.append(a["p_paddr"] + done)
        assert mismatches == []


def test_paused_vmcore_equals_qemu_dump(arm64_cpu_guest: QemuGuest, tmp_path: Path) -> None:
    """The live vmcore of the paused guest is QEMU's dump, byte for byte
    (-cpu max: with NT_ARM_SVE notes; cortex-a57: without)."""
    g = arm64_cpu_guest
    oracle = tmp_path / "qemu.dump"
    with g.paused(), Mount(g) as m:
        g.dump(oracle)
        _assert_same_core(m.vmcore, oracle, sve=g.spec.cpu.startswith("max"))


def test_vmcorefs_dump_equals_qemu_dump(arm64_guest: QemuGuest, tmp_path: Path) -> None:
    """``vmcorefs dump`` (sparse ELF) of the paused guest is QEMU's dump too."""
    oracle, ours = tmp_path / "qemu.dump", tmp_path / "vmcorefs.dump"
    with arm64_guest.paused():
        arm64_guest.dump(oracle)
        r = run_vmcorefs("dump", "--quiet", arm64_guest.qmp_path, str(ours))
        assert r.returncode == 0, r.stderr
        _assert_same_core(ours, oracle)


def test_info_says_aarch64(arm64_guest: QemuGuest) -> None:
    r = run_vmcorefs("info", arm64_guest.qmp_path, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["arch"] == "aarch64"
    assert info["vcpus"] == 2
    assert info["vmcoreinfo"]["OSRELEASE"] == arm64_guest.release
    ram = {b["name"]: b["access"] for b in info["memory"] if b["kind"] == "ram"}
    assert ram == {"mem0": "shared", "mem1": "procmem"}
    assert info["gdb"].startswith("gdb-multiarch -q -ex 'symbol-file -o 0x")
    text = run_vmcorefs("info", arm64_guest.qmp_path)
    assert text.returncode == 0 and "aarch64" in text.stdout


def _kcore_translate(elf: ELFFile, vaddr: int) -> tuple[int, int]:
    """(file offset, p_paddr) of kernel-virtual ``vaddr`` in a kcore."""
    for s in _segments(elf, "PT_LOAD"):
        if s["p_vaddr"] <= vaddr < s["p_vaddr"] + s["p_memsz"]:
            return s["p_offset"] + vaddr - s["p_vaddr"], s["p_paddr"] + vaddr - s["p_vaddr"]
    raise AssertionError(f"{vaddr:#x} not in kcore")


def test_kcore_maps_kernel_image_and_linear_map(arm64_cpu_guest: QemuGuest) -> None:
    """kcore from the guest's own TTBR1 tables: the kernel image at
    ``_stext`` maps ``_stext - kimage_voffset``, the linear map covers all
    RAM (``__phys_to_virt``), and bytes equal pmem's."""
    with arm64_cpu_guest.paused(), Mount(arm64_cpu_guest) as m, open(m.kcore, "rb") as k, open(m.pmem, "rb") as p:
        vci = vmcoreinfo_dict((m.path / "vmcoreinfo").read_text())
        elf = ELFFile(k)
        assert elf["e_machine"] == "EM_AARCH64"
        stext = int(vci["SYMBOL(_stext)"], 16)
        voffset = int(vci["NUMBER(kimage_voffset)"], 16)
        offset, paddr = _kcore_translate(elf, stext)
        assert paddr == stext - voffset
        assert _read(k, offset, 4096) == _read(p, paddr, 4096)
        page_offset = (1 << 64) - (1 << int(vci["NUMBER(VA_BITS)"]))
        for gpa in (0x4000_0000, 0x4FFF_F000, 0x5000_0000, 0x5FFF_F000):
            # Linux's __phys_to_virt: (pa - PHYS_OFFSET) | PAGE_OFFSET, modulo 2**64
            # (KASLR also moves the linear map when the CPU's PA range allows:
            # then PHYS_OFFSET is "negative").
            va = ((gpa - int(vci["NUMBER(PHYS_OFFSET)"], 16)) % (1 << 64)) | page_offset
            offset, paddr = _kcore_translate(elf, va)
            assert paddr == gpa
            assert _read(k, offset, 4096) == _read(p, gpa, 4096)
        assert len(_segments(elf, "PT_LOAD")) < 10000


def test_gdb_multiarch_on_kcore(arm64_cpu_guest: QemuGuest, arm64_vmlinux: Path) -> None:
    """gdb-multiarch with the gdbinit (KASLR offset applied) reads
    linux_banner from kcore at its randomised address."""
    require(shutil.which("gdb-multiarch") is not None, "gdb-multiarch not installed")
    g = arm64_cpu_guest
    with Mount(g) as m:
        assert "# usage: gdb-multiarch -q VMLINUX -x " in (m.path / "gdbinit").read_text()
        offset = int(vmcoreinfo_dict((m.path / "vmcoreinfo").read_text())["KERNELOFFSET"], 16)
        assert offset != 0  # QEMU's device tree gave the kernel a KASLR seed
        r = subprocess.run(["gdb-multiarch", "-q", "-batch", str(arm64_vmlinux), "-x", str(m.path / "gdbinit"),
                            "-ex", "print/x (unsigned long)&linux_banner", "-ex", "print linux_banner"],
                           capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    addr = re.search(r"^\$1 = (0x[0-9a-f]+)$", r.stdout, re.M)
    assert addr, r.stdout + r.stderr
    nm = subprocess.run(["nm", str(arm64_vmlinux)], capture_output=True, text=True, check=True).stdout
    (linked,) = re.findall(r"^([0-9a-f]+) \S linux_banner$", nm, re.M)
    assert int(addr[1], 16) == int(linked, 16) + offset
    assert f'"Linux version {g.release} ' in r.stdout


def test_drgn_with_debuginfo(arm64_guest: QemuGuest, arm64_vmlinux: Path) -> None:
    """drgn (an x86-64 build, arm64 support built in) on the live vmcore:
    the task list, and each vCPU's task unwound from QEMU's NT_PRSTATUS."""
    with Mount(arm64_guest) as m:
        got = drgn_tasks(m.vmcore, arm64_vmlinux)
    assert got.release == arm64_guest.release
    assert got.tasks >= 20  # init, sh, the tick loop, kthreads
    assert [c.cpu for c in got.on_cpu] == [0, 1]
    for c in got.on_cpu:
        assert c.frames >= 2, c
        assert not c.innermost.startswith("0x"), c


def test_crash_arm64_on_live_vmcore(arm64_guest: QemuGuest, arm64_vmlinux: Path) -> None:
    """crash built for ARM64 (from the same Debian source as the x86 crash 9):
    sys, ps, bt -a and log on the live vmcore."""
    require(CRASH_ARM64.exists(), f"no {CRASH_ARM64}: run scripts/build-tools.sh crash-arm64")
    # --freeze: crash refuses a vCPU's task that exited before it looked.
    with Mount(arm64_guest, "--freeze") as m:
        out = run_crash(arm64_vmlinux, m.vmcore, "sys\nps\nbt -a\nlog", crash=CRASH_ARM64)
    assert re.search(r"RELEASE: " + re.escape(arm64_guest.release), out), out[-3000:]
    assert re.search(r"MACHINE: aarch64", out), out[-3000:]
    # ps: PID 1 (/init exec'd a shell) with its parent 0
    assert re.search(r"^\s*>?\s*1\s+0\s+\d+\s+[0-9a-f]+\s+[A-Z]{2}\s+[\d.]+\s+\d+\s+\d+\s+\S+$", out, re.M), out[-3000:]
    for cpu in (0, 1):  # bt -a: the task on each vCPU, from QEMU's NT_PRSTATUS notes
        assert re.search(rf"^PID: \s*\d+\s+TASK: [0-9a-f]+\s+CPU: {cpu}\s", out, re.M), out[-3000:]
    assert "Run /init as init process" in out  # log
    assert "seek error" not in out and "invalid kernel virtual address" not in out, out[-3000:]
