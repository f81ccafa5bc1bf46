"""vmcore against QEMU's own dump-guest-memory, and the tools users run."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from vmcorefs.testing import (
    load_mismatches,
    BACKPORTS,
    DEBIAN12,
    QEMU10,
    SYSTEM_QEMU,
    GuestSpec,
    KernelAssets,
    Mount,
    Qemu,
    QemuGuest,
    memory_cgroup,
    printk_head_addr,
    printk_head_id,
    require,
    run_vmcorefs,
    vmcoreinfo_dict,
    wait_for,
)

pytestmark = pytest.mark.integration
CHUNK = 1 << 20


def _loads(elf: ELFFile) -> list[tuple[int, int, int, int]]:
    """(p_paddr, p_memsz, p_offset, p_filesz) of every PT_LOAD."""
    return [(s["p_paddr"], s["p_memsz"], s["p_offset"], s["p_filesz"])
            for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]


def _note_bytes(f, elf: ELFFile) -> bytes:  # type: ignore[no-untyped-def]
    (note,) = [s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"]
    f.seek(note["p_offset"])
    return bytes(f.read(note["p_filesz"]))


@pytest.fixture(params=["memfd", "private", "qemu10_memfd", "qemu10_private"])
def both_qemus_guest(request: pytest.FixtureRequest) -> QemuGuest:
    """Both memory kinds on Debian 12's QEMU 7.2 (6.1 guest) and on QEMU 10 (6.12 guest)."""
    return request.getfixturevalue(f"{request.param}_guest")  # type: ignore[no-any-return]


def test_paused_vmcore_equals_qemu_dump(both_qemus_guest: QemuGuest, tmp_path: Path) -> None:
    """Layout, notes and every PT_LOAD byte equal dump-guest-memory's."""
    guest = both_qemus_guest
    oracle = tmp_path / "qemu.dump"
    with guest.paused(), Mount(guest) as m, open(m.vmcore, "rb") as ours:
        guest.dump(oracle)
        with open(oracle, "rb") as theirs:
            e_ours, e_theirs = ELFFile(ours), ELFFile(theirs)
            assert e_ours["e_type"] == "ET_CORE" and e_ours.elfclass == 64
            assert e_ours["e_machine"] == e_theirs["e_machine"]
            assert e_ours["e_phoff"] == 64
            assert e_ours["e_shnum"] == 0
            phdrs = list(e_ours.iter_segments())
            assert phdrs[0]["p_type"] == "PT_NOTE"
            assert all(s["p_type"] == "PT_LOAD" for s in phdrs[1:])
            ours_loads, their_loads = _loads(e_ours), _loads(e_theirs)
            assert [(p, n) for p, n, _, _ in ours_loads] == [(p, n) for p, n, _, _ in their_loads]
            for s_ours, s_theirs in zip(phdrs[1:], [s for s in e_theirs.iter_segments() if s["p_type"] == "PT_LOAD"]):
                assert s_ours["p_vaddr"] == s_theirs["p_vaddr"]
                assert s_ours["p_offset"] % 4096 == 0
                assert s_ours["p_filesz"] == s_ours["p_memsz"]
                assert s_ours["p_offset"] >= phdrs[0]["p_offset"] + phdrs[0]["p_filesz"]
            assert _note_bytes(ours, e_ours) == _note_bytes(theirs, e_theirs)
            # Every byte of every PT_LOAD.
            assert load_mismatches(ours, theirs, [(p, n, oo, ot) for (p, n, oo, _), (_, _, ot, _)
                                                  in zip(ours_loads, their_loads)]) == []
            assert os.fstat(ours.fileno()).st_size == ours_loads[-1][2] + ours_loads[-1][1]


def test_pmem_matches_vmcore(memfd_guest: QemuGuest) -> None:
    """pmem is guest-physical: same bytes as the PT_LOADs, zeros in holes."""
    with memfd_guest.paused(), Mount(memfd_guest) as m, open(m.vmcore, "rb") as v, open(m.pmem, "rb") as p:
        loads = _loads(ELFFile(v))
        assert os.fstat(p.fileno()).st_size == max(a + n for a, n, _, _ in loads)
        for paddr, size, off, _ in loads:
            for delta in (0, size // 2, size - 4096):
                v.seek(off + delta)
                p.seek(paddr + delta)
                assert v.read(4096) == p.read(4096)
        p.seek(0xFEC00000)  # the IOAPIC: not RAM, reads as zeros
        assert p.read(4096) == bytes(4096)


def test_files_and_modes(memfd_guest: QemuGuest) -> None:
    with Mount(memfd_guest) as m:
        assert sorted(os.listdir(m.path)) == ["gdbinit", "kcore", "pmem", "vmcore", "vmcoreinfo"]
        for name in ("vmcore", "pmem", "vmcoreinfo", "kcore", "gdbinit"):
            st = os.stat(m.path / name)
            assert stat.S_IMODE(st.st_mode) == 0o400
            assert st.st_uid == os.getuid()
        assert os.stat(m.vmcore).st_blksize >= 1 << 17
        text = (m.path / "vmcoreinfo").read_text()
        assert text.startswith(f"OSRELEASE={memfd_guest.release}\n")
        with pytest.raises(OSError):
            open(m.vmcore, "r+b")
        # A read spanning EOF is short only at EOF.
        size = os.stat(m.vmcore).st_size
        with open(m.vmcore, "rb") as f:
            f.seek(size - 100)
            assert len(f.read(1000)) == 100
            assert f.read(10) == b""


def test_readelf_notes_clean(memfd_guest: QemuGuest) -> None:
    with Mount(memfd_guest) as m:
        for tool in ("readelf", "eu-readelf"):
            require(shutil.which(tool) is not None, f"{tool} not installed")
            r = subprocess.run([tool, "-n", str(m.vmcore)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert r.stderr == ""
            assert "VMCOREINFO" in r.stdout
            assert r.stdout.count("NT_PRSTATUS") == 2 or r.stdout.count("PRSTATUS") == 2


def test_info(guest: QemuGuest) -> None:
    r = run_vmcorefs("info", guest.qmp_path, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["qemu_pid"] == guest.pid
    assert info["arch"] == "x86_64"
    assert info["vcpus"] == 2
    assert info["vmcoreinfo"]["OSRELEASE"] == guest.release
    ram = [b for b in info["memory"] if b["kind"] == "ram"]
    assert sum(b["size"] for b in ram) == guest.mem_mb << 20
    expected = "shared" if guest.spec.memory == "memfd" else "procmem"
    assert {b["access"] for b in ram} == {expected}
    text = run_vmcorefs("info", guest.qmp_path)
    assert text.returncode == 0 and f"OSRELEASE={guest.release}" in text.stdout


def test_live_reads_see_guest_change(memfd_guest: QemuGuest) -> None:
    """--direct: no cache between reader and guest: the printk head moves
    between reads, across opens and within one open handle."""
    with Mount(memfd_guest, "--direct") as m:
        vci = vmcoreinfo_dict((m.path / "vmcoreinfo").read_text())
        first = printk_head_id(m.pmem, vci)
        # The guest logs ten messages a second; 30 s leave room for a busy host.
        wait_for(lambda: printk_head_id(m.pmem, vci) != first, 30, "printk head moving (across opens)", 0.1)
        addr = printk_head_addr(vci, m.pmem)
        with open(m.pmem, "rb", buffering=0) as f:
            first_bytes = os.pread(f.fileno(), 8, addr)
            wait_for(lambda: os.pread(f.fileno(), 8, addr) != first_bytes, 30, "printk head moving (one handle)",
                     0.1)


def test_notes_refreshed_at_open(memfd_guest: QemuGuest) -> None:
    """Registers are those of the moment of opening."""
    with Mount(memfd_guest) as m:
        notes = set()

        def reopen() -> bool:
            with open(m.vmcore, "rb") as f:
                notes.add(_note_bytes(f, ELFFile(f)))
            return len(notes) > 1

        wait_for(reopen, 30, "notes differing between opens", 0.2)


def test_freeze(memfd_guest: QemuGuest) -> None:
    g = memfd_guest
    assert g.status() == "running"
    with Mount(g, "--freeze") as m:
        assert g.status() == "running"
        a = open(m.vmcore, "rb")
        assert g.status() == "paused"
        b = open(m.pmem, "rb")
        a.close()
        assert g.status() == "paused"
        b.close()
        # FUSE RELEASE is asynchronous: the resume follows the close shortly.
        wait_for(lambda: g.status() == "running", 30, "resume after the last close")
        # vmcoreinfo does not freeze.
        (m.path / "vmcoreinfo").read_text()
        assert g.status() == "running"
        # Another open then release by the kernel even if the reader is killed.
        reader = subprocess.Popen(["sh", "-c", f"exec 3<{m.vmcore}; exec sleep 30"])
        wait_for(lambda: g.status() == "paused", 30, "pause at open")
        reader.kill()
        reader.wait()
        wait_for(lambda: g.status() == "running", 30, "resume after the reader's death")
        # A guest paused by someone else stays paused.
        g.qmp("stop")
        with open(m.vmcore, "rb"):
            pass
        time.sleep(0.5)
        assert g.status() == "paused"
        g.qmp("cont")


@pytest.mark.parametrize("qemu, kernel", [(SYSTEM_QEMU, DEBIAN12), (QEMU10, BACKPORTS)], ids=["qemu7.2", "qemu10"])
def test_split_numa_hotplug_equals_dump(tmp_path: Path, qemu: Qemu, kernel: KernelAssets) -> None:
    """RAM split around the 4 GiB hole, two NUMA backends (memfd + private),
    then a hotplugged DIMM: the layout follows at the next open, open handles
    keep theirs, and every byte still equals QEMU's dump."""
    spec = GuestSpec("numa", qemu=qemu, kernel=kernel, mib=3584, memory="none",
                     extra=("-m", "3584M,slots=2,maxmem=8G",
                            "-object", "memory-backend-memfd,id=m0,size=2G,share=on",
                            "-object", "memory-backend-ram,id=m1,size=1536M",
                            "-numa", "node,memdev=m0", "-numa", "node,memdev=m1"))
    with QemuGuest(spec) as g:
        with Mount(g) as m:
            old = open(m.vmcore, "rb")
            old_loads = _loads(ELFFile(old))
            assert any(p >= 1 << 32 for p, _, _, _ in old_loads), "no RAM above 4 GiB"
            g.qmp("object-add", **{"qom-type": "memory-backend-memfd", "id": "d0", "size": 256 << 20, "share": True})
            g.qmp("device_add", driver="pc-dimm", id="dimm0", memdev="d0")
            with g.paused(), open(m.vmcore, "rb") as ours:
                new_loads = _loads(ELFFile(ours))
                assert len(new_loads) == len(old_loads) + 1
                # The handle opened before the hotplug keeps its layout.
                old.seek(0)
                assert _loads(ELFFile(old)) == old_loads
                oracle = Path("/dev/shm") / f"vmcorefs-test-{os.getpid()}.dump"
                try:
                    g.dump(oracle)
                    with open(oracle, "rb") as theirs:
                        e_theirs = ELFFile(theirs)
                        their_loads = _loads(e_theirs)
                        assert [(p, n) for p, n, _, _ in new_loads] == [(p, n) for p, n, _, _ in their_loads]
                        assert _note_bytes(ours, ELFFile(ours)) == _note_bytes(theirs, e_theirs)
                        for (paddr, size, off_o, _), (_, _, off_t, _) in zip(new_loads, their_loads):
                            for done in range(0, size, 4 * CHUNK):
                                n = min(4 * CHUNK, size - done)
                                ours.seek(off_o + done)
                                theirs.seek(off_t + done)
                                assert ours.read(n) == theirs.read(n), f"mismatch at {paddr + done:#x}"
                finally:
                    oracle.unlink(missing_ok=True)
            old.close()


def test_cache_mode(memfd_guest: QemuGuest, tmp_path: Path) -> None:
    """Cached reads (the default): bytes still equal QEMU's dump when frozen;
    within one open a page is cached for at most --max-age seconds, then the
    same open sees the guest change; each open starts fresh; the cached
    pages go at close."""
    g = memfd_guest
    with Mount(g, "--max-age", "30") as m:
        vci = vmcoreinfo_dict((m.path / "vmcoreinfo").read_text())
        addr = printk_head_addr(vci, m.pmem)
        with open(m.pmem, "rb", buffering=0) as f:
            first = os.pread(f.fileno(), 8, addr)
            time.sleep(0.5)
            assert os.pread(f.fileno(), 8, addr) == first  # cached within one open
        wait_for(lambda: printk_head_id(m.pmem, vci).to_bytes(8, "little") != first, 30,
                 "a reopen seeing the guest change", 0.1)
        # Reading all of RAM fills the page cache; closing empties it again.
        # Counted in a memory cgroup of this test's own: the host's Cached
        # moves with every other process.
        with memory_cgroup() as cached:
            before = cached()
            with open(m.pmem, "rb") as f:
                while f.read(1 << 20):
                    pass
                during = cached()
            assert during - before > (g.mem_mb << 20) // 2, (before, during)
            # The drop follows the (asynchronous) FUSE RELEASE: GiBs take a moment.
            wait_for(lambda: cached() - before < (g.mem_mb << 20) // 4, 30, "cached pages dropped at close")
    with Mount(g, "--max-age", "0.3") as m:
        vci = vmcoreinfo_dict((m.path / "vmcoreinfo").read_text())
        addr = printk_head_addr(vci, m.pmem)
        with open(m.pmem, "rb", buffering=0) as f:
            first = os.pread(f.fileno(), 8, addr)
            deadline = time.monotonic() + 30
            ages = 0
            while os.pread(f.fileno(), 8, addr) == first:  # the same open, no reopen
                assert time.monotonic() < deadline, "cached bytes outlived --max-age"
                time.sleep(0.1)
                ages += 1
            assert ages >= 1  # and it was cached at first (10 ticks/s would change it in 0.1 s)
    with g.paused(), Mount(g, "--freeze") as m, open(m.vmcore, "rb") as ours:
        oracle = g.dump(tmp_path / "qemu.dump")
        with open(oracle, "rb") as theirs:
            o_loads, t_loads = _loads(ELFFile(ours)), _loads(ELFFile(theirs))
            for (paddr, size, off_o, _), (_, _, off_t, _) in zip(o_loads, t_loads):
                for done in range(0, size, CHUNK):
                    n = min(CHUNK, size - done)
                    ours.seek(off_o + done)
                    theirs.seek(off_t + done)
                    assert ours.read(n) == theirs.read(n), hex(paddr + done)
