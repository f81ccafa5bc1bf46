"""The tools users run with the guest kernel's debug vmlinux, on a live guest:
crash, drgn, gdb (through kcore), makedumpfile + crash, libkdumpfile."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from elftools.elf.elffile import ELFFile

from vmcorefs.core.vmcoreinfo import parse_fields
from vmcorefs.dump import check_filter, makedumpfile_args
from vmcorefs.errors import UsageError
from vmcorefs.testing import (
    BACKPORTS,
    CRASH9,
    DEBIAN11,
    DEBIAN12,
    DRGN_KALLSYMS,
    KERNEL_SPACE,
    GuestSpec,
    Mount,
    QEMU10,
    QemuGuest,
    drgn_tasks,
    gdb_on_kcore,
    gdb_threads,
    kernel_image_phys,
    makedumpfile,
    require,
    run_crash,
    run_vmcorefs,
    vmcoreinfo_dict,
)

pytestmark = pytest.mark.integration
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def vmlinux() -> Path:
    path = DEBIAN12.vmlinux
    require(path.exists(), f"debug vmlinux missing ({path}); run scripts/build-guest.sh --dbg")
    return path


def _crash(vmlinux: Path, dump: Path, commands: str) -> str:
    """Debian 12's crash (8.0.2; crash 9 runs in test_matrix.py)."""
    return run_crash(vmlinux, dump, commands)


@pytest.mark.parametrize("freeze", [False, True], ids=["running", "freeze"])
def test_crash_sys_log_ps_bt(memfd_guest: QemuGuest, vmlinux: Path, freeze: bool) -> None:
    with Mount(memfd_guest, *(["--freeze"] if freeze else [])) as m:
        out = _crash(vmlinux, m.vmcore, "sys\nlog\nps\nbt -a")
    assert re.search(rf"RELEASE: {re.escape(memfd_guest.release)}\n", out), out[:2000]
    assert f"Linux version {memfd_guest.release}" in out
    assert "VMCOREFS-TICK" in out
    # ps runs; crash 8.0.2 with this 6.1 kernel lists only the idle tasks
    # and cannot read the exception stacks for bt -a -- on QEMU's own dump
    # too (see test_crash_same_output_as_qemu_dump): crash's limit, not ours.
    assert re.search(r">\s+0\s+0\s+0\s+\w+\s+RU\s.*\[swapper/0\]", out), out[-3000:]
    assert "PID: 0 " in out
    limit = "read of stack at" in out
    assert limit or "#0 " in out


def test_crash_same_output_as_qemu_dump(memfd_guest: QemuGuest, vmlinux: Path, tmp_path: Path) -> None:
    """Paused guest: crash prints the same for our vmcore as for QEMU's dump."""
    commands = "sys\nlog\nps\nbt -a"
    with memfd_guest.paused(), Mount(memfd_guest) as m:
        ours = _crash(vmlinux, m.vmcore, commands)
        theirs = _crash(vmlinux, memfd_guest.dump(tmp_path / "qemu.dump"), commands)

    def normal(text: str) -> list[str]:
        return [line for line in text.splitlines() if "DUMPFILE:" not in line]

    assert normal(ours) == normal(theirs)


@pytest.mark.parametrize("freeze", [False, True], ids=["running", "freeze"])
def test_drgn_with_debuginfo(guest: QemuGuest, vmlinux: Path, freeze: bool) -> None:
    """Registers come from the moment of open(); memory is live.  Frozen, the
    on-CPU tasks unwind completely; running, the stack may already have moved
    on, so only the innermost frame (from the note's registers) is certain."""
    # Running, a vCPU may switch tasks between the open() that captured its
    # registers and drgn's read of the runqueue: then drgn unwinds the new
    # task with the old registers.  That race is rare; allow two retries.
    for attempt in range(1 if freeze else 3):
        with Mount(guest, *(["--freeze"] if freeze else [])) as m:
            d = drgn_tasks(m.vmcore, vmlinux)
        if all(not (c.comm.startswith("swapper/") and c.innermost.startswith("0x")) for c in d.on_cpu):
            break
    assert d.release == guest.release
    assert d.tasks > 10
    # The guest spawns a short-lived process ten times a second: while it
    # runs, the task list may change between the two walks.
    assert d.tasks == d.threads if freeze else abs(d.tasks - d.threads) <= 2
    assert len(d.on_cpu) == 2, d
    for c in d.on_cpu:
        assert c.frames >= 1
        if c.comm.startswith("swapper/"):  # in the kernel: the PC from our note is a kernel function
            assert not c.innermost.startswith("0x"), d
            if freeze:
                assert c.frames >= 3 and c.outermost == "secondary_startup_64", d


@pytest.mark.parametrize("freeze", [False, True], ids=["running", "freeze"])
def test_gdb_on_kcore(memfd_guest: QemuGuest, vmlinux: Path, freeze: bool) -> None:
    with Mount(memfd_guest, *(["--freeze"] if freeze else [])) as m:
        out = gdb_on_kcore(vmlinux, m.path, "print linux_banner", "info threads")
    assert f'"Linux version {memfd_guest.release} ' in out, out
    threads = gdb_threads(out)
    assert [n for n, _, _ in threads] == [1, 2], out
    # A vCPU in the kernel has a symbolised PC (one in user space cannot have).
    kernel = [fn for _, pc, fn in threads if pc is None or pc >= KERNEL_SPACE]
    assert kernel and all(fn != "??" for fn in kernel), out


def test_makedumpfile_then_crash(memfd_guest: QemuGuest, vmlinux: Path, tmp_path: Path) -> None:
    require(shutil.which("makedumpfile") is not None, "makedumpfile not installed")
    out = tmp_path / "filtered.kdump"
    with Mount(memfd_guest) as m:
        r = subprocess.run(["makedumpfile", "--message-level", "4", "-c", "-d", "31", str(m.vmcore), str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
    text = _crash(vmlinux, out, "sys\nlog")
    assert f"RELEASE: {memfd_guest.release}" in text
    assert "VMCOREFS-TICK" in text


def test_libkdumpfile(memfd_guest: QemuGuest) -> None:
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import kdumpfile, addrxlat"], capture_output=True)
    require(probe.returncode == 0, "python3-libkdumpfile not installed")
    # libkdumpfile translates the kernel-virtual address itself (k.read of a
    # KVADDR).  python3-libkdumpfile 0.5.1's explicit FullAddress.conv() can
    # fail inside its own binding ("'Context' object has no attribute
    # 'cb_read_caps'") for some KASLR layouts, so it is not used here.
    script = r"""
import sys, kdumpfile, addrxlat
k = kdumpfile.kdumpfile(sys.argv[1])
k.attr["addrxlat.ostype"] = "linux"
vci = k.attr["linux.vmcoreinfo.lines"]
print("osrelease", k.attr["linux.uts.release"])
name = int(vci["OFFSET(uts_namespace.name)"])
virt = int(vci["SYMBOL(init_uts_ns)"], 16) + name
phys = int(sys.argv[2], 16) + name
via_virt = bytes(k.read(addrxlat.KVADDR, virt, 64))
print("sysname", via_virt[:5].decode())
print("same", via_virt == bytes(k.read(addrxlat.KPHYSADDR, phys, 64)))
"""
    with Mount(memfd_guest) as m:
        vci = vmcoreinfo_dict((m.path / "vmcoreinfo").read_text())
        phys = kernel_image_phys(vci, "init_uts_ns")
        r = subprocess.run([SYSTEM_PYTHON, "-c", script, str(m.vmcore), f"{phys:#x}"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"osrelease {memfd_guest.release}" in r.stdout
    assert "sysname Linux" in r.stdout
    assert "same True" in r.stdout


def test_kcore_layout_and_bytes(memfd_guest: QemuGuest) -> None:
    """kcore PT_LOADs are kernel-virtual, each backed by the physical bytes it names."""
    with memfd_guest.paused(), Mount(memfd_guest) as m, open(m.path / "kcore", "rb") as k, \
            open(m.pmem, "rb") as p, open(m.vmcore, "rb") as v:
        vci = vmcoreinfo_dict((m.path / "vmcoreinfo").read_text())
        ek = ELFFile(k)
        segs = list(ek.iter_segments())
        assert segs[0]["p_type"] == "PT_NOTE"
        loads = [s for s in segs[1:] if s["p_type"] == "PT_LOAD"]
        assert len(loads) == len(segs) - 1 and 1 < len(loads) < 65535
        assert all(s["p_vaddr"] >= 0xFFFF800000000000 and s["p_offset"] % 4096 == 0 for s in loads)
        # Same notes as vmcore.
        ev = ELFFile(v)
        nv = [s for s in ev.iter_segments() if s["p_type"] == "PT_NOTE"][0]
        k.seek(segs[0]["p_offset"])
        v.seek(nv["p_offset"])
        assert k.read(segs[0]["p_filesz"]) == v.read(nv["p_filesz"])
        # The kernel image mapping holds init_uts_ns at its virtual address.
        uts = int(vci["SYMBOL(init_uts_ns)"], 16)
        (text,) = [s for s in loads if s["p_vaddr"] <= uts < s["p_vaddr"] + s["p_memsz"]]
        k.seek(text["p_offset"] + uts - text["p_vaddr"] + int(vci["OFFSET(uts_namespace.name)"]))
        assert k.read(5) == b"Linux"
        # Every PT_LOAD's bytes equal pmem at p_paddr (sampled).
        for s in loads[:: max(1, len(loads) // 200)]:
            for delta in {0, s["p_memsz"] // 2 & ~4095, s["p_memsz"] - 4096}:
                if delta < 0:
                    continue
                k.seek(s["p_offset"] + delta)
                p.seek(s["p_paddr"] + delta)
                assert k.read(4096) == p.read(4096), hex(s["p_vaddr"] + delta)
        for tool in ("readelf", "eu-readelf"):
            r = subprocess.run([tool, "-n", str(m.path / "kcore")], capture_output=True, text=True)
            assert r.returncode == 0 and r.stderr == "", r.stderr


#: Guests whose VMCOREINFO vmcorefs must find in guest RAM: no -device
#: vmcoreinfo on Debian 12's QEMU 7.2 (6.1, and 5.10) and on QEMU 10 (6.12),
#: memfd and private RAM; and the device present but qemu_fw_cfg refused by
#: the guest kernel, so that it never registers (``GuestSpec.fw_cfg``).
NO_DEVICE = {
    "5.10-memfd": GuestSpec("novmci-5.10-memfd", kernel=DEBIAN11, memory="memfd", vmcoreinfo=False),
    "6.1-memfd": GuestSpec("novmci-6.1-memfd", memory="memfd", vmcoreinfo=False),
    "6.1-private": GuestSpec("novmci-6.1-private", memory="private", vmcoreinfo=False),
    "6.12-memfd": GuestSpec("novmci-6.12-memfd", qemu=QEMU10, kernel=BACKPORTS, memory="memfd", vmcoreinfo=False),
    "6.12-private": GuestSpec("novmci-6.12-private", qemu=QEMU10, kernel=BACKPORTS, memory="private",
                              vmcoreinfo=False),
    "6.1-unregistered": GuestSpec("unreg-6.1", memory="memfd", vmcoreinfo=True, fw_cfg=False),
}


@pytest.mark.parametrize("case", list(NO_DEVICE))
def test_without_vmcoreinfo_device(case: str, tmp_path: Path) -> None:
    """Without VMCOREINFO from the device, vmcorefs finds the guest's own in
    guest RAM and serves it where QEMU would have: the last note of vmcore,
    the vmcoreinfo file, gdbinit; drgn (kallsyms where the kernel publishes
    them, and with the debug vmlinux), makedumpfile and crash 9 then work as with the device, and
    `vmcorefs info` says where it was -- and, when the device is there but
    the guest never registered, why it did not come from the device."""
    spec = NO_DEVICE[case]
    require(shutil.which("makedumpfile") is not None, "makedumpfile not installed")
    require(spec.kernel.vmlinux.exists(), f"debug vmlinux missing ({spec.kernel.vmlinux}); run scripts/setup.sh")
    require(CRASH9.exists(), f"crash 9 missing ({CRASH9}); run scripts/build-tools.sh crash")
    with QemuGuest(spec) as g:
        if not spec.fw_cfg:
            assert "init: qemu_fw_cfg failed to load" in g.serial.read_text(errors="replace")
        info = run_vmcorefs("info", g.qmp_path)
        assert info.returncode == 0, info.stderr
        never = "; -device vmcoreinfo is present but the guest never registered (load its qemu_fw_cfg driver)"
        assert re.search(r"^VMCOREINFO   OSRELEASE=\S+ KERNELOFFSET=[0-9a-f]+ PAGESIZE=4096 "
                         r"\(from guest RAM at GPA 0x[0-9a-f]+" + re.escape("" if spec.fw_cfg else never) + r"\)$",
                         info.stdout, re.M), info.stdout
        assert "gdb -q -ex 'symbol-file -o 0x" in info.stdout
        with g.paused(), Mount(g) as m:
            assert sorted(os.listdir(m.path)) == ["gdbinit", "kcore", "pmem", "vmcore", "vmcoreinfo"]
            text = (m.path / "vmcoreinfo").read_text()
            vci = vmcoreinfo_dict(text)
            assert vci["OSRELEASE"] == g.spec.kernel.release and vci["PAGESIZE"] == "4096"
            with open(m.vmcore, "rb") as f:
                notes = [n for seg in ELFFile(f).iter_segments() if seg["p_type"] == "PT_NOTE"
                         for n in seg.iter_notes()]
            assert [n["n_name"] for n in notes].count("VMCOREINFO") == 1
            assert notes[-1]["n_name"] == "VMCOREINFO" and text.encode() in notes[-1]["n_desc"]
            # The kernel image lies where VMCOREINFO says (KASLR offset and phys_base right).
            with open(m.pmem, "rb") as p:
                p.seek(kernel_image_phys(vci, "init_uts_ns"))
                assert vci["OSRELEASE"].encode() in p.read(4096)
            # drgn without debuginfo: kallsyms through VMCOREINFO, whose
            # kallsyms symbols Linux 5.10 does not publish yet.
            kallsyms = "SYMBOL(kallsyms_names)" in vci
            assert kallsyms != case.startswith("5.10"), sorted(vci)
            if kallsyms:
                r = subprocess.run([sys.executable, "-c", DRGN_KALLSYMS, str(m.vmcore)], capture_output=True,
                                   text=True, timeout=300)
                assert r.returncode == 0 and r.stdout.startswith("Linux version " + vci["OSRELEASE"]), r.stderr
            d = drgn_tasks(m.vmcore, spec.kernel.vmlinux)
            assert d.release == g.release and d.tasks > 10 and d.tasks == d.threads, d
            assert sorted(c.cpu for c in d.on_cpu) == list(range(spec.vcpus)), d
            # -d 31 where Debian 12's makedumpfile reads this kernel's slab
            # pages right, else -d 23 (vmcorefs.dump.check_filter; docs/cookbook.md).
            level = 31
            try:
                check_filter(makedumpfile_args("kdump-zlib", level), level, parse_fields(text))
            except UsageError:
                level = 23
            assert (level == 23) == case.startswith("6.12"), level
            out = tmp_path / "filtered.kdump"
            makedumpfile(m.vmcore, out, "-c", "-d", str(level))
            assert out.read_bytes()[:8] == b"KDUMP   "
            crash = run_crash(spec.kernel.vmlinux, m.vmcore, "sys", crash=CRASH9)
        assert re.search(rf"^\s+RELEASE: {re.escape(g.release)}$", crash, re.M), crash[-3000:]
        assert "WARNING" not in crash and "invalid" not in crash, crash[-3000:]
        filtered = run_crash(spec.kernel.vmlinux, out, "sys", crash=CRASH9)
        assert re.search(rf"^\s+RELEASE: {re.escape(g.release)}$", filtered, re.M), filtered[-3000:]


@pytest.fixture(scope="module")
def old_guest() -> Iterator[QemuGuest]:
    """Debian 11's cloud kernel (5.10), which crash 8.0.2 fully supports."""
    require(DEBIAN11.vmlinux.exists(), f"Debian 11 guest missing ({DEBIAN11.dir}); run scripts/build-guest.sh --old")
    with QemuGuest(GuestSpec("bullseye", kernel=DEBIAN11)) as g:
        yield g


def test_crash_ps_and_bt_on_a_kernel_crash_supports(old_guest: QemuGuest, tmp_path: Path) -> None:
    """Where crash understands the kernel, ps lists every task and bt unwinds
    them -- on the live vmcore.  `bt -a` of the idle tasks on the vCPUs fails
    in crash 8.0.2 for QEMU dumps (exception stacks), identically on QEMU's
    own dump of the same instant."""
    vmlinux = DEBIAN11.vmlinux
    with old_guest.paused(), Mount(old_guest) as m:
        # kthreadd (PID 2) always sleeps; PID 1 may be on a vCPU mid-exec.
        ours = _crash(vmlinux, m.vmcore, "sys\nps\nbt 2\nbt -a")
        theirs = _crash(vmlinux, old_guest.dump(tmp_path / "qemu.dump"), "sys\nps\nbt 2\nbt -a")
    assert f"RELEASE: {old_guest.release}" in ours
    tasks = re.findall(r"^[ >]\s+\d+\s+\d+\s+\d+\s+[0-9a-f]+\s+\w\w\s", ours, re.M)
    assert len(tasks) > 30, ours
    assert re.search(r"^\s+2\s+0\s+\d\s+[0-9a-f]+\s+\w\w\s.*\[kthreadd\]$", ours, re.M), ours
    assert re.search(r"PID: 2 .*\n #0 \[[0-9a-f]+\] __schedule at", ours), ours
    assert [line for line in ours.splitlines() if "DUMPFILE" not in line] == \
           [line for line in theirs.splitlines() if "DUMPFILE" not in line]
