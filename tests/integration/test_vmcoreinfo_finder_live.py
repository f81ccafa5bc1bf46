"""VMCOREINFO found in the RAM of real guests (qemu/scan.py), without
``-device vmcoreinfo``: Debian 12's 6.1 and Debian 11's 5.10 kernels, on
memfd and private RAM.

Oracles: on a guest *with* the device, the copy found in RAM equals QEMU's
own VMCOREINFO note byte for byte; without the device, the text equals what
a guest of the same kernel publishes, except for what KASLR moves between
boots; ``KERNELOFFSET`` agrees with the debug vmlinux's ``_stext``.  On
private RAM the scan must not grow QEMU's memory or page tables.  Timings
are printed (``pytest -s``), never asserted.
"""

from __future__ import annotations

import asyncio
import functools
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from elftools.elf.elffile import ELFFile

from vmcorefs.core.notes import parse_notes, qemu_x86_cpu_states, vmcoreinfo_text
from vmcorefs.core.paging import START_KERNEL_MAP
from vmcorefs.core.vmcoreinfo import Found, NotFound, parse_fields
from vmcorefs.qemu.guest import Guest
from vmcorefs.qemu.memory import parse_maps
from vmcorefs.qemu.monitor import connect
from vmcorefs.qemu.scan import ScanLimits, find_vmcoreinfo, revalidate
from vmcorefs.testing import DEBIAN11, DEBIAN12, GuestSpec, KernelAssets, QemuGuest, require

pytestmark = pytest.mark.integration

KERNELS = {"6.1": DEBIAN12, "5.10": DEBIAN11}
#: Values that differ between two boots of one kernel.
PER_BOOT = ("KERNELOFFSET", "NUMBER(phys_base)", "CRASHTIME")
#: x86-64 KASLR moves the direct map (where SYMBOL(mem_section) points) in 1 GiB steps.
DIRECT_MAP_STEP = 1 << 30


@dataclass
class Scan:
    #: QEMU's own VMCOREINFO note (None without the device).
    qemu_vmcoreinfo: str | None
    result: Found | NotFound
    revalidated: Found | NotFound | None = None


async def _scan(g: QemuGuest, limits: ScanLimits = ScanLimits(), previous: Found | None = None) -> Scan:
    """The finder called directly on QEMU's blocks, sources and notes (not
    through Guest.snapshot, which may add the VMCOREINFO it finds)."""
    monitor = await connect(g.qmp_path)
    guest = Guest(monitor)
    try:
        blocks = await guest.ram_blocks()
        notes = parse_notes((await guest.dump_info(blocks)).notes)
        sources = guest.memory.sources(blocks)
        cpus = qemu_x86_cpu_states(notes)
        result = find_vmcoreinfo(guest.memory, sources, cpus, limits)
        again = None if previous is None else revalidate(previous, guest.memory, sources, cpus)
        return Scan(vmcoreinfo_text(notes), result, again)
    finally:
        guest.close()
        await monitor.close()


def scan(g: QemuGuest, limits: ScanLimits = ScanLimits(), previous: Found | None = None) -> Scan:
    """Find VMCOREINFO in ``g``'s RAM, paused (one instant)."""
    with g.paused():
        return asyncio.run(_scan(g, limits, previous))


def boot_independent(text: str) -> list[tuple[str, str]]:
    """VMCOREINFO lines with what KASLR changes between boots taken out:
    kernel-image symbols relative to KERNELOFFSET, other addresses modulo
    the direct map's KASLR step, per-boot numbers dropped."""
    fields = parse_fields(text)
    koff = int(fields["KERNELOFFSET"], 16)
    out = []
    for key, value in fields.items():
        if key in PER_BOOT:
            continue
        if key.startswith("SYMBOL("):
            addr = int(value, 16)
            value = f"image+{addr - koff:x}" if addr >= START_KERNEL_MAP else f"~{addr % DIRECT_MAP_STEP:x}"
        out.append((key, value))
    return out


@functools.cache
def vmlinux_stext(kernel: KernelAssets) -> int:
    """``_stext`` in the kernel's debug vmlinux (link-time, no KASLR)."""
    with open(kernel.vmlinux, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert symtab is not None
        (sym,) = symtab.get_symbol_by_name("_stext")  # type: ignore[attr-defined]
        return int(sym["st_value"])


@pytest.fixture(scope="module", params=list(KERNELS))
def published(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, Scan]]:
    """(kernel, what the guest publishes with -device vmcoreinfo, the scan of that guest)."""
    kernel = KERNELS[request.param]
    with QemuGuest(GuestSpec(f"vci-{request.param}", kernel=kernel, vmcoreinfo=True)) as g:
        s = scan(g)
        assert s.qemu_vmcoreinfo is not None, "the guest did not publish VMCOREINFO"
        yield request.param, s.qemu_vmcoreinfo, s


def test_found_equals_qemus_note(published: tuple[str, str, Scan]) -> None:
    """With the device, the copy in RAM is the note the guest registered:
    the same text as QEMU's VMCOREINFO note, byte for byte."""
    name, text, s = published
    r = s.result
    assert isinstance(r, Found), r
    assert r.text == text
    assert r.form == "note" and r.twin_gpa is not None, r
    assert r.text.startswith(f"OSRELEASE={KERNELS[name].release}\n")
    print(f"\n{name} with -device vmcoreinfo: note at {r.gpa:#x}, text at {r.twin_gpa:#x}; {r.stats}")


@pytest.mark.parametrize("memory", ["memfd", "private"])
def test_found_without_the_device(published: tuple[str, str, Scan], memory: str) -> None:
    name, text, _ = published
    kernel = KERNELS[name]
    with QemuGuest(GuestSpec(f"novci-{name}-{memory}", kernel=kernel, memory=memory,  # type: ignore[arg-type]
                             vmcoreinfo=False)) as g:
        s = scan(g)
        full = scan(g, ScanLimits(stop_at_pair=False))
    assert s.qemu_vmcoreinfo is None
    r = s.result
    assert isinstance(r, Found), r
    assert r.form == "note" and r.twin_gpa is not None
    assert boot_independent(r.text) == boot_independent(text)
    fields = parse_fields(r.text)
    require(kernel.vmlinux.exists(), f"debug vmlinux missing ({kernel.vmlinux}); run scripts/build-guest.sh")
    assert int(fields["SYMBOL(_stext)"], 16) - int(fields["KERNELOFFSET"], 16) == vmlinux_stext(kernel)
    # The whole scan finds the same, and nothing else that validates.
    f = full.result
    assert isinstance(f, Found) and f.stats.complete
    assert (f.text, f.gpa, f.twin_gpa) == (r.text, r.gpa, r.twin_gpa)
    assert all(o.text == r.text for o in f.others), f.others
    print(f"\n{name} {memory} {g.mem_mb} MiB, no device: note at {r.gpa:#x}, text at {r.twin_gpa:#x}"
          f"\n  to the pair: {r.stats}\n  full scan:   {f.stats}\n  rejected: {f.rejected}")


def _status(pid: int) -> dict[str, int]:
    """QEMU's own VmRSS and VmPTE (kB) from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmPTE"):
                out[key] = int(value.split()[0])
    return out


def test_private_ram_scan_grows_nothing_in_qemu() -> None:
    """A full scan of private RAM (1 GiB, mostly never touched) reads only
    what QEMU populated: its RSS and page tables stay as they were."""
    with QemuGuest(GuestSpec("novci-rss", memory="private", mib=1024, vmcoreinfo=False)) as g:
        with g.paused():
            before = _status(g.pid)
            s = asyncio.run(_scan(g, ScanLimits(stop_at_pair=False)))
            after = _status(g.pid)
    r = s.result
    assert isinstance(r, Found), r
    assert r.stats.bytes_skipped > 512 << 20, r.stats  # most of the guest was never touched
    assert after["VmPTE"] - before["VmPTE"] <= 8, (before, after)
    assert after["VmRSS"] - before["VmRSS"] <= 1024, (before, after)
    print(f"\nprivate 1 GiB full scan: {r.stats}; QEMU before {before}, after {after}")


def _plant(g: QemuGuest, text: str) -> tuple[int, int]:
    """Write a note and a text copy of ``text`` into two pages of ``g``'s
    memfd RAM that the guest never touched (holes: no guest data is lost);
    the guest-physical addresses of the two copies."""
    hva = g.gpa2hva(0)
    with open(f"/proc/{g.pid}/maps") as f:
        m = next(m for m in parse_maps(f.read()) if m.start <= hva < m.end)
    fd = os.open(f"/proc/{g.pid}/map_files/{m.start:x}-{m.end:x}", os.O_RDWR | os.O_CLOEXEC)
    try:
        base = m.offset + (hva - m.start)  # file offset of GPA 0
        holes = []
        off = base + (1 << 20)
        while len(holes) < 2:
            off = os.lseek(fd, off, os.SEEK_HOLE)
            holes.append(off - base)
            off += 4096
        desc = text.encode()
        note = struct.pack("<III", 11, len(desc), 0) + b"VMCOREINFO\0\0" + desc + bytes(-len(desc) % 4 + 12)
        os.pwrite(fd, note, base + holes[0])
        os.pwrite(fd, desc, base + holes[1])
        return holes[0], holes[1]
    finally:
        os.close(fd)


def test_revalidate_then_reset() -> None:
    """The result of a scan revalidates while the guest runs on; after a
    reset into a new boot (new KASLR offsets), the old result no longer
    validates -- unless the new boot wrote the very same text -- and a new
    scan finds the new boot's VMCOREINFO."""
    with QemuGuest(GuestSpec("novci-reset", vmcoreinfo=False, reboot=True)) as g:
        first = scan(g).result
        assert isinstance(first, Found), first
        again = scan(g, previous=first).revalidated
        assert isinstance(again, Found) and (again.text, again.gpa) == (first.text, first.gpa)
        g.serial.write_bytes(b"")
        g.qmp("system_reset")
        g.wait_ready()
        s = scan(g, previous=first)
        with g.paused():
            stale = _plant(g, first.text)
            planted = asyncio.run(_scan(g, ScanLimits(stop_at_pair=False))).result
    new = s.result
    assert isinstance(new, Found), new
    assert boot_independent(new.text) == boot_independent(first.text)
    old = s.revalidated
    assert isinstance(old, NotFound) or old.text == new.text, old
    print(f"\nafter reset: old result -> {old if isinstance(old, NotFound) else 'still valid'};"
          f" new at {new.gpa:#x} KERNELOFFSET={parse_fields(new.text)['KERNELOFFSET']}"
          f" (was {parse_fields(first.text)['KERNELOFFSET']}); rejected: {new.rejected}")
    # The previous boot's copies, planted in RAM, are seen and rejected.
    assert isinstance(planted, Found) and (planted.text, planted.gpa) == (new.text, new.gpa), planted
    if first.text != new.text:  # (the same KASLR offsets twice would make them the live text)
        reasons = {r.gpa: r.reason for r in planted.rejected}
        assert set(stale) <= set(reasons), (stale, planted.rejected)
        assert all("not mapped" in reasons[a] or "another kernel's copy" in reasons[a] for a in stale), reasons
    print(f"planted the first boot's copies at {stale[0]:#x}, {stale[1]:#x}: {planted.rejected}")
