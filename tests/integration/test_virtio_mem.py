"""virtio-mem: only the plugged blocks are in vmcore's PT_LOADs, as in QEMU's own dump.

A guest with 512 MiB of RAM and a 2 GiB virtio-mem device (nothing plugged at
boot; /init loads the guest's virtio_mem driver): ``info mtree -f`` shows the
whole 2 GiB region, QEMU's ``dump-guest-memory`` only what the guest has
plugged (QEMU asks the RAM discard manager).  With the guest paused, vmcore's
PT_LOADs, notes and every byte equal QEMU's dump with nothing plugged and
after the host asks for more (``requested-size``), and reading all of
vmcore and pmem allocates no host memory for the device.  The same on QEMU
7.2 and 10, with the device on a memfd and on private RAM.  Without a dump
(notes from registers, as for a libvirt domain) the map comes from
``query-memory-devices``: exact when nothing (or everything) is plugged,
the whole region otherwise.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
from elftools.elf.elffile import ELFFile

from vmcorefs.core.elf import DumpInfo
from vmcorefs.core.memmap import GuestPhysBlock
from vmcorefs.qemu.guest import Guest
from vmcorefs.qemu.monitor import connect
from vmcorefs.testing import QEMU10, SYSTEM_QEMU, GuestSpec, Mount, QemuGuest, require, wait_for

pytestmark = pytest.mark.integration
MiB, GiB = 1 << 20, 1 << 30
VMEM_GPA, VMEM_SIZE = 4 * GiB, 2 * GiB  # where QEMU puts the device (after RAM, above 4 GiB)
CHUNK = 4 << 20
BACKENDS = {
    "memfd": ("-object", "memory-backend-memfd,id=mem0,size=512M,share=on", "-machine", "memory-backend=mem0",
              "-object", "memory-backend-memfd,id=vmem0,size=2G,share=on"),
    "private": ("-object", "memory-backend-ram,id=vmem0,size=2G"),
}


@pytest.fixture(scope="module", params=[
    *(pytest.param((qemu, backend, ""), id=f"qemu{name}-{backend}")
      for name, qemu in (("7.2", SYSTEM_QEMU), ("10", QEMU10)) for backend in BACKENDS),
    # QEMU >= 8.2 can map the region in memslots as they get plugged: then
    # info mtree -f shows only those (none at first).
    pytest.param((QEMU10, "memfd", ",dynamic-memslots=on"), id="qemu10-memfd-dynamic-memslots")])
def vmem_guest(request: pytest.FixtureRequest) -> Iterator[QemuGuest]:
    qemu, backend, options = request.param
    require(qemu.missing() is None, qemu.missing() or "")
    spec = GuestSpec(f"vmem-{backend}", qemu=qemu, machine="q35", mib=512, memory="none",
                     extra=("-m", "512M,maxmem=4G", *BACKENDS[backend],
                            "-device", f"virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0{options}"))
    with QemuGuest(spec) as g:
        try:
            wait_for(lambda: b"virtio_mem virtio0: plugged size" in g.serial.read_bytes(), 60,
                     "the guest's virtio_mem driver")
        except AssertionError:
            require(False, "the guest has no virtio_mem driver (rebuild it: scripts/build-guest.sh)")
        yield g


def _loads(elf: ELFFile) -> list[tuple[int, int, int]]:
    """(p_paddr, p_memsz, p_offset) of every PT_LOAD."""
    return [(s["p_paddr"], s["p_memsz"], s["p_offset"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]


def _notes(f, elf: ELFFile) -> bytes:  # type: ignore[no-untyped-def]
    (note,) = [s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"]
    f.seek(note["p_offset"])
    return bytes(f.read(note["p_filesz"]))


def _plugged(g: QemuGuest) -> int:
    (dev,) = [d["data"] for d in g.qmp("query-memory-devices") if d["type"] == "virtio-mem"]
    return int(dev["size"])


def _vmem_allocated(g: QemuGuest) -> int:
    """Bytes of host memory behind the device: the memfd's allocated blocks,
    or the resident size of QEMU's private mapping (found by ``gpa2hva``, or
    as the memfd mapping of the region's size while none of it is mapped in
    the guest)."""
    answer = g.hmp(f"gpa2hva {VMEM_GPA:#x}")
    hva = int(answer.rsplit(" ", 1)[1], 16) if answer.startswith("Host virtual address") else None
    with open(f"/proc/{g.pid}/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        lo, dash, hi = line.split(" ", 1)[0].partition("-")
        if not dash or not all(c in "0123456789abcdef" for c in lo + hi):
            continue
        start, end = int(lo, 16), int(hi, 16)
        if start <= (hva if hva is not None else -1) < end or (hva is None and "memfd:" in line
                                                                and end - start == VMEM_SIZE):
            if "memfd:" in line:
                return os.stat(f"/proc/{g.pid}/map_files/{lo}-{hi}").st_blocks * 512
            rss = next(x for x in lines[i + 1:] if x.startswith("Rss:"))
            return int(rss.split()[1]) * 1024
    raise AssertionError(f"no mapping of QEMU holds the device's memory ({answer.strip()})")


def _read_all(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass


def _assert_reads_allocate_nothing(g: QemuGuest, m: Mount) -> None:
    """Reading all of vmcore and pmem adds no host memory behind the device
    (before QEMU's own dump, which does: it reads every plugged page through
    QEMU's mapping)."""
    before = _vmem_allocated(g)
    _read_all(m.vmcore)
    _read_all(m.pmem)
    assert _vmem_allocated(g) == before


def _assert_equals_qemu_dump(g: QemuGuest, m: Mount, oracle: Path) -> list[tuple[int, int]]:
    """The paused guest's vmcore against QEMU's dump: PT_LOADs, notes, every
    byte.  Returns the PT_LOADs ``(p_paddr, p_memsz)``."""
    g.dump(oracle)
    try:
        with open(m.vmcore, "rb") as ours, open(oracle, "rb") as theirs:
            e_ours, e_theirs = ELFFile(ours), ELFFile(theirs)
            mine, qemus = _loads(e_ours), _loads(e_theirs)
            assert [(p, n) for p, n, _ in mine] == [(p, n) for p, n, _ in qemus]
            assert _notes(ours, e_ours) == _notes(theirs, e_theirs)
            for (paddr, size, off_o), (_, _, off_t) in zip(mine, qemus):
                for done in range(0, size, CHUNK):
                    n = min(CHUNK, size - done)
                    ours.seek(off_o + done)
                    theirs.seek(off_t + done)
                    assert ours.read(n) == theirs.read(n), f"mismatch at {paddr + done:#x}"
    finally:
        oracle.unlink(missing_ok=True)
    return [(p, n) for p, n, _ in mine]


def _in_vmem(loads: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(p, n) for p, n in loads if VMEM_GPA <= p < VMEM_GPA + VMEM_SIZE]


class _NoDumpGuest(Guest):
    """A :class:`Guest` whose notes come without their dump's PT_LOADs -- what
    :class:`~vmcorefs.qemu.libvirt.LibvirtGuest` gives (it never dumps), so
    the map falls back to ``query-memory-devices``."""

    async def dump_info(self, blocks: list[GuestPhysBlock]) -> DumpInfo:
        return replace(await super().dump_info(blocks), loads=())


def _blocks_without_dump(g: QemuGuest) -> list[tuple[int, int]]:
    async def run() -> list[tuple[int, int]]:
        monitor = await connect(g.qmp_path)
        guest = _NoDumpGuest(monitor)
        try:
            return [(b.gpa, b.size) for b in (await guest.snapshot()).blocks]
        finally:
            guest.close()
            await monitor.close()
    return asyncio.run(run())


def _plug(g: QemuGuest, size: int) -> None:
    g.qmp("qom-set", path="/machine/peripheral/vm0", property="requested-size", value=size)
    wait_for(lambda: _plugged(g) == size, 300, f"virtio-mem to plug {size >> 20} MiB")


def test_virtio_mem_equals_qemu_dump(vmem_guest: QemuGuest) -> None:
    g = vmem_guest
    oracle = Path("/dev/shm") / f"vmcorefs-vmem-{os.getpid()}.dump"
    assert _plugged(g) == 0
    dynamic = "dynamic-memslots=on" in " ".join(g.args)
    # The whole region (none of it with dynamic memslots).
    assert (f"{VMEM_GPA:016x}-{VMEM_GPA + VMEM_SIZE - 1:016x}" in g.hmp("info mtree -f")) != dynamic

    with g.paused():
        with Mount(g) as m:
            _assert_reads_allocate_nothing(g, m)
            loads = _assert_equals_qemu_dump(g, m, oracle)
            assert _in_vmem(loads) == []
            assert os.stat(m.pmem).st_size == max(p + n for p, n in loads) < VMEM_GPA + 1 * MiB
        # Without a dump: nothing plugged is exact too.
        assert _blocks_without_dump(g) == loads

    _plug(g, 256 * MiB)
    with g.paused():
        with Mount(g) as m:
            _assert_reads_allocate_nothing(g, m)
            loads = _assert_equals_qemu_dump(g, m, oracle)
            assert sum(n for _, n in _in_vmem(loads)) == 256 * MiB
        # Without a dump, a partly plugged device is listed whole (or its
        # mapped memslots).
        without = _blocks_without_dump(g)
        assert (VMEM_GPA, VMEM_SIZE) in without or dynamic
        assert sum(n for _, n in _in_vmem(without)) >= 256 * MiB
        assert [b for b in without if b[0] < VMEM_GPA] == [b for b in loads if b[0] < VMEM_GPA]

    _plug(g, 512 * MiB)
    with g.paused(), Mount(g) as m:
        loads = _assert_equals_qemu_dump(g, m, oracle)
        assert sum(n for _, n in _in_vmem(loads)) == 512 * MiB
    assert g.status() == "running"


def test_open_ends_qemus_dump_cleanly(vmem_guest: QemuGuest) -> None:
    """Each open stops QEMU's dump once its headers and notes are read: QEMU
    survives the broken pipe, resumes the running guest, reports the dump
    failed having written at most two pages of RAM, and dumps again."""
    g = vmem_guest
    assert g.status() == "running"
    with Mount(g) as m:
        for _ in range(3):
            with open(m.vmcore, "rb") as f:
                assert f.read(4) == b"\x7fELF"
            assert g.status() == "running"
            state = g.qmp("query-dump")
            assert state["status"] == "failed" and state["completed"] <= 2 * 4096, state
    assert g.proc.poll() is None
