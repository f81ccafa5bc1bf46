"""The live core's rules without FUSE or QEMU (vmcorefs.live.LiveCore).

A :class:`FakeGuest` stands in for QEMU: its RAM is a memfd (read through
the same SHARED extents as a real memfd guest), its notes are shaped like
QEMU's, its run state answers pause/resume, and its layout can change
(hotplug), fail, hang, or find QEMU gone.  Time is a fake clock.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unit_support import fake_cpu_notes, fake_mem, materialise

from vmcorefs.core.elf import DumpInfo
from vmcorefs.core.layout import ExtentKind
from vmcorefs.core.memmap import GuestPhysBlock
from vmcorefs.errors import NoSuchFileError, QEMUGoneError, QMPError, QMPTimeoutError
from vmcorefs.live import FILES, REFRESH_BACKOFF, LiveCore, LiveDirectory
from vmcorefs.qemu.guest import Snapshot
from vmcorefs.qemu.memory import Source

MiB = 1 << 20
IDENT64 = b"\x7fELF\x02\x01\x01" + bytes(9)
VMCOREINFO = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nKERNELOFFSET=1c000000\n"


class FakeGuest:
    """A guest of ``sizes`` RAM blocks (MiB each, 1 MiB apart) in one memfd."""

    def __init__(self, clock: "FakeClock", sizes: tuple[int, ...] = (2, 1), status: str = "running",
                 vmcoreinfo: bytes | None = VMCOREINFO) -> None:
        self.clock = clock
        self.status_value = status
        self.vmcoreinfo = vmcoreinfo
        self.memfd = os.memfd_create("fake-guest-ram")
        self.ram_size = 16 * MiB
        os.ftruncate(self.memfd, self.ram_size)
        os.pwrite(self.memfd, fake_mem(0, self.ram_size), 0)
        self.sizes = sizes
        self.calls: list[str] = []
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.exited = False
        self.generation = 0

    def blocks(self) -> list[GuestPhysBlock]:
        out, gpa = [], 0
        for n in self.sizes:
            out.append(GuestPhysBlock(gpa, n * MiB, 0x7F00_0000_0000 + gpa, "ram", "ram"))
            gpa += (n + 1) * MiB
        return out

    async def snapshot(self) -> Snapshot:
        self.calls.append("snapshot")
        if self.gate is not None:
            # As QEMU's dump-guest-memory: the guest is stopped while it runs.
            was, self.status_value = self.status_value, "paused" if self.status_value == "running" else self.status_value
            await self.gate.wait()
            self.status_value = was if self.status_value == "paused" else self.status_value
        if self.fail is not None:
            raise self.fail
        self.generation += 1  # each snapshot's notes differ, like a running guest's registers
        notes = fake_cpu_notes(2, self.vmcoreinfo) + bytes([self.generation % 256]) * 4
        blocks = self.blocks()
        sources = [Source(b, self.memfd, b.gpa, ExtentKind.SHARED, "memfd:fake") for b in blocks]
        return Snapshot.build(blocks, sources, DumpInfo(IDENT64, 62, 0, notes, True),
                              alive=lambda: not self.exited, taken=self.clock())

    async def status(self) -> str:
        return self.status_value

    async def pause(self) -> None:
        self.calls.append("pause")
        self.status_value = "paused"

    async def resume(self) -> None:
        self.calls.append("resume")
        self.status_value = "running"

    def close(self) -> None:
        os.close(self.memfd)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def guest(clock: FakeClock) -> Any:
    g = FakeGuest(clock)
    yield g
    g.close()


def make(guest: FakeGuest, clock: FakeClock, **kw: Any) -> LiveCore:
    return LiveCore(guest, "/mnt/vm", clock=clock, wall_ns=lambda: int(clock.now * 1e9), **kw)


# -- files ---------------------------------------------------------------------

def test_registry_and_listing(guest: FakeGuest, clock: FakeClock) -> None:
    async def go() -> None:
        core = make(guest, clock)
        snap = await core.current()
        # No page-table root in a zeroed fake RAM: kcore is absent, the rest listed.
        assert [spec.name for spec, _ in core.listed(snap)] == ["vmcore", "pmem", "vmcoreinfo", "gdbinit"]
        assert {spec.name for spec in FILES} == {"vmcore", "pmem", "vmcoreinfo", "kcore", "gdbinit"}
        assert core.file("vmcoreinfo", snap).prefix == VMCOREINFO.decode().encode()
        assert b"core-file /mnt/vm/kcore" in core.file("gdbinit", snap).prefix
        with pytest.raises(NoSuchFileError):
            core.file("kcore", snap)
        with pytest.raises(NoSuchFileError):
            await core.open("nonesuch")
    run(go())


def test_no_vmcoreinfo_no_vmcoreinfo_or_gdbinit(clock: FakeClock) -> None:
    g = FakeGuest(clock, vmcoreinfo=None)
    try:
        core = make(g, clock)
        snap = run(core.current())
        names = [spec.name for spec, _ in core.listed(snap)]
        # kcore may still come from a vCPU's CR3 (the fake notes' vCPUs are in kernel mode).
        assert "vmcoreinfo" not in names and "gdbinit" not in names and names[:2] == ["vmcore", "pmem"]
    finally:
        g.close()


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["vmcore", "pmem"]), st.integers(0, 4 * MiB), st.integers(0, 2 * MiB))
def test_reads_equal_the_layout(name: str, offset: int, size: int) -> None:
    clock = FakeClock()
    g = FakeGuest(clock)
    try:
        async def go() -> None:
            core = make(g, clock)
            h = await core.open(name)
            assert all(s.kind == ExtentKind.SHARED and s.fd == g.memfd for s in h.file.segments)
            whole = materialise(h.layout)
            assert bytes(core.read(h, offset, size)) == whole[offset:offset + size]
            await core.release(h)
        run(go())
    finally:
        g.close()


# -- --freeze --------------------------------------------------------------------

def test_freeze_refcount(guest: FakeGuest, clock: FakeClock) -> None:
    async def go() -> None:
        core = make(guest, clock, freeze=True)
        info = await core.open("vmcoreinfo")        # not guest memory: no pause
        assert "pause" not in guest.calls
        a = await core.open("vmcore")
        b = await core.open("pmem")
        assert guest.calls.count("pause") == 1 and guest.status_value == "paused"
        await core.release(a)
        assert guest.status_value == "paused"
        await core.release(info)
        await core.release(b)
        assert guest.calls.count("resume") == 1 and guest.status_value == "running"
        await core.release(b)                        # a second release changes nothing
        assert guest.calls.count("resume") == 1
    run(go())


def test_freeze_interleaved_opens_and_closes(guest: FakeGuest, clock: FakeClock) -> None:
    async def reader(core: LiveCore, name: str, delay: int) -> None:
        for _ in range(delay):
            await asyncio.sleep(0)
        h = await core.open(name)
        for _ in range(delay):
            await asyncio.sleep(0)
            assert guest.status_value == "paused"     # paused whenever a handle is open
        core.read(h, 0, 4096)
        await core.release(h)

    async def go() -> None:
        core = make(guest, clock, freeze=True)
        await asyncio.gather(*(reader(core, ("vmcore", "pmem")[i % 2], i % 7) for i in range(30)))
        transitions = [c for c in guest.calls if c in ("pause", "resume")]
        assert transitions and transitions == ["pause", "resume"] * (len(transitions) // 2)
        assert guest.status_value == "running" and not core.paused_by_us and not core.handles
    run(go())


def test_freeze_leaves_a_paused_guest_paused(clock: FakeClock) -> None:
    g = FakeGuest(clock, status="paused")
    try:
        async def go() -> None:
            core = make(g, clock, freeze=True)
            h = await core.open("vmcore")
            await core.release(h)
        run(go())
        assert "pause" not in g.calls and "resume" not in g.calls
    finally:
        g.close()


def test_failed_open_gives_its_freeze_share_back(guest: FakeGuest, clock: FakeClock) -> None:
    async def go() -> None:
        core = make(guest, clock, freeze=True)
        guest.fail = QMPTimeoutError("no answer within 10 s", "human-monitor-command")
        with pytest.raises(QMPTimeoutError):
            await core.open("vmcore")
        assert guest.calls.count("pause") == guest.calls.count("resume") == 1
        assert guest.status_value == "running"
    run(go())


def test_reader_that_dies_during_open_gives_its_share_back(guest: FakeGuest, clock: FakeClock) -> None:
    """The opener goes away (its task cancelled) while the snapshot is taken."""
    async def go() -> None:
        core = make(guest, clock, freeze=True)
        other = await core.open("pmem")
        guest.gate = asyncio.Event()
        task = asyncio.create_task(core.open("vmcore"))
        while guest.calls[-1] != "snapshot":
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert guest.status_value == "paused"        # `other` still holds it
        guest.gate = None
        await core.release(other)
        assert guest.status_value == "running" and guest.calls.count("resume") == 1
    run(go())


@pytest.mark.parametrize("how", ["cancelled", "timeout"])
def test_open_stopped_as_its_stop_is_answered_resumes_the_guest(guest: FakeGuest, clock: FakeClock,
                                                                 how: str) -> None:
    """The stop was sent and QEMU did it, but the open was cancelled (a
    signal: vmcorefs dump's Ctrl-C as the guest paused) or timed out before
    the answer: the guest must not stay paused with nobody holding it."""
    async def go() -> None:
        core = make(guest, clock, freeze=True)
        answered = asyncio.Event()

        async def pause_then_hang() -> None:
            guest.calls.append("pause")
            guest.status_value = "paused"              # QEMU did the stop...
            if how == "timeout":
                raise QMPTimeoutError("no answer within 10 s", "stop")
            answered.set()
            await asyncio.Event().wait()               # ...but its answer is not in yet

        guest.pause = pause_then_hang  # type: ignore[method-assign]
        task = asyncio.create_task(core.open("vmcore"))
        if how == "cancelled":
            await answered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(QMPTimeoutError):
                await task
        assert guest.status_value == "running" and guest.calls == ["pause", "resume"]
        assert not core.paused_by_us
        # The next open pauses and resumes as usual.
        guest.pause = FakeGuest.pause.__get__(guest)  # type: ignore[method-assign]
        h = await core.open("vmcore")
        assert guest.status_value == "paused"
        await core.release(h)
        assert guest.status_value == "running"
    run(go())


# -- layouts, hotplug, page cache ---------------------------------------------------

def test_layout_changes_between_opens_never_under_a_handle(guest: FakeGuest, clock: FakeClock) -> None:
    async def go() -> None:
        core = make(guest, clock)
        h1 = await core.open("pmem")
        before = bytes(core.read(h1, 0, 8 * MiB))
        assert h1.file.size == 4 * MiB
        guest.sizes = (2, 1, 3)                        # a DIMM plugged
        h2 = await core.open("pmem")
        assert h2.file.size == 8 * MiB and h1.file.size == 4 * MiB
        assert bytes(core.read(h1, 0, 8 * MiB)) == before
        # The page cache is the file's: h2 shows another layout, so it reads directly.
        assert not h1.direct and h2.direct
        assert await core.release(h1) is True          # no cached handle left: drop the cache
        assert await core.release(h2) is False         # direct handles leave no cache
        h3 = await core.open("pmem")
        assert not h3.direct                           # nothing cached is open any more
        await core.release(h3)
    run(go())


def test_same_layout_shares_the_cache(clock: FakeClock) -> None:
    g = FakeGuest(clock, status="paused")
    try:
        async def go() -> None:
            core = make(g, clock)
            a = await core.open("pmem")                # pmem has no notes: same layout twice
            b = await core.open("pmem")
            assert not a.direct and not b.direct
            assert await core.release(a) is False      # b still reads from the cache
            assert await core.release(b) is True
            v1 = await core.open("vmcore")             # the notes differ between opens
            v2 = await core.open("vmcore")
            assert not v1.direct and v2.direct
            await core.release(v1)
            await core.release(v2)
        run(go())
    finally:
        g.close()


def test_direct_mode(guest: FakeGuest, clock: FakeClock) -> None:
    async def go() -> None:
        core = make(guest, clock, cache=False)
        h = await core.open("vmcore")
        assert h.direct and core.attr_timeout == 0
        assert await core.release(h) is False
    run(go())


def test_listing_and_cache_policy(guest: FakeGuest, clock: FakeClock) -> None:
    async def go() -> None:
        cached, direct = make(guest, clock, max_age=2.5), make(guest, clock, cache=False)
        listing = await cached.listing()
        snap = await cached.current()
        assert [name for name, _ in listing] == ["vmcore", "pmem", "vmcoreinfo", "gdbinit"]
        assert dict(listing)["pmem"] == cached.stat("pmem", snap) == await cached.stat_now("pmem")
        with pytest.raises(NoSuchFileError):
            await cached.stat_now("kcore")
        assert (cached.cache_policy, direct.cache_policy) == ("max-age 2.5 s", "direct")
        # Only cached pages of guest memory are left to drop when QEMU goes away.
        assert cached.cached_memory_files() == ["vmcore", "pmem", "kcore"]
        assert direct.cached_memory_files() == []
    run(go())


def test_directory_holds_only_current_cores(guest: FakeGuest, clock: FakeClock) -> None:
    tree = LiveDirectory()
    removed: list[LiveCore] = []
    tree.on_remove = removed.append
    old, new = make(guest, clock, name="vm"), make(guest, clock, name="vm")
    tree.add(old)
    assert tree.holds(old)
    tree.add(new)  # a new VM of the same name replaces the old one
    assert tree.holds(new) and not tree.holds(old) and removed == [old]
    with pytest.raises(QEMUGoneError):
        old.check_alive()
    tree.remove("vm", "stopped")
    assert not tree.holds(new) and removed == [old, new]


def test_staleness_and_attributes(guest: FakeGuest, clock: FakeClock) -> None:
    async def go() -> None:
        core = make(guest, clock, max_age=2.0)
        s1 = await core.current()
        assert await core.current() is s1              # within attr_ttl
        clock.now += 1.5
        s2 = await core.current()
        assert s2 is not s1 and s2.taken == clock.now
        # A refresh that fails serves the previous layout for listings...
        clock.now += 5
        guest.fail = QMPTimeoutError("no answer within 10 s", "human-monitor-command")
        assert await core.current() is s2
        # ...but not for an open.
        with pytest.raises(QMPTimeoutError):
            await core.open("vmcore")
        # After a failed refresh, listings do not ask QEMU again for a while
        # (each would wait the whole timeout on a hung QEMU); opens do.
        asked = guest.calls.count("snapshot")
        clock.now += 5
        assert await core.current() is s2 and guest.calls.count("snapshot") == asked
        with pytest.raises(QMPTimeoutError):
            await core.open("vmcore")
        assert guest.calls.count("snapshot") == asked + 1
        guest.fail = None
        clock.now += REFRESH_BACKOFF
        s3 = await core.current()
        assert s3 is not s2 and guest.calls.count("snapshot") == asked + 2
        s2 = s3
        # Cached: mtime is "now" (the kernel drops pages older than max_age); attributes live max_age.
        assert core.attr_timeout == 2.0
        assert core.attributes(s2.vmcore, s2).mtime_ns == int(clock.now * 1e9)
        assert core.attributes(s2.vmcore, s2).size == s2.vmcore.size
    run(go())
    frozen = make(guest, clock, freeze=True)
    snap = run(frozen.current())
    clock.now += 100
    assert frozen.attributes(snap.vmcore, snap).mtime_ns == frozen.created_ns
    direct = make(guest, clock, cache=False)
    snap = run(direct.current())
    clock.now += 3
    assert direct.attributes(snap.vmcore, snap).mtime_ns == int((clock.now - 3) * 1e9)


def test_stat_never_smaller_than_an_open_layout(guest: FakeGuest, clock: FakeClock) -> None:
    """The kernel cuts reads of every handle at the size stat last said: a
    file that shrank or vanished (a reboot) keeps the size of what is open."""
    async def go() -> None:
        core = make(guest, clock)
        big = await core.open("vmcore")
        info = await core.open("vmcoreinfo")
        guest.sizes = (1,)          # RAM shrinks...
        guest.vmcoreinfo = None     # ...and the guest reboots: no VMCOREINFO yet
        clock.now += 5
        snap = await core.current()
        assert snap.vmcore.size < big.layout.size
        assert core.stat("vmcore", snap).size == big.layout.size
        assert core.stat("vmcoreinfo", snap).size == info.layout.size
        assert core.stat("pmem", snap).size == snap.pmem.size
        await core.release(big)
        await core.release(info)
        assert core.stat("vmcore", snap).size == snap.vmcore.size
        with pytest.raises(NoSuchFileError):
            core.stat("vmcoreinfo", snap)
    run(go())


# -- QEMU gone --------------------------------------------------------------------------

def test_qemu_gone_fails_opens_and_reads(guest: FakeGuest, clock: FakeClock) -> None:
    gone: list[LiveCore] = []

    async def go() -> None:
        core = make(guest, clock, freeze=True)
        core.on_gone = gone.append
        h = await core.open("vmcore")
        core.guest_gone("QEMU (pid 1234) exited")
        core.guest_gone("again")
        assert gone == [core] and core.gone_reason == "QEMU (pid 1234) exited"
        with pytest.raises(QEMUGoneError):
            core.read(h, 0, 10)
        with pytest.raises(QEMUGoneError):
            await core.open("pmem")
        with pytest.raises(QEMUGoneError):
            await core.current()
        await core.release(h)                     # no resume of a QEMU that is gone
        assert "resume" not in guest.calls
    run(go())


def test_snapshot_finding_qemu_gone_marks_the_core(guest: FakeGuest, clock: FakeClock) -> None:
    async def go() -> None:
        core = make(guest, clock)
        guest.fail = QEMUGoneError("monitor connection lost (EOFError)", "query-status")
        with pytest.raises(QEMUGoneError):
            await core.open("vmcore")
        assert core.gone_reason is not None
        assert not isinstance(QEMUGoneError("x"), QMPError)
    run(go())


def test_read_finding_qemu_gone(guest: FakeGuest, clock: FakeClock) -> None:
    """A PROCMEM read that fails while QEMU has exited raises QEMUGoneError."""
    async def go() -> None:
        core = make(guest, clock)
        h = await core.open("pmem")
        bad = os.open("/dev/null", os.O_RDONLY)
        os.close(bad)                              # a descriptor that fails every read
        seg = h.file.segments[0]
        h.file = type(h.file)(h.file.prefix, (seg._replace(kind=ExtentKind.PROCMEM, fd=bad),), h.file.size)
        guest.exited = True
        with pytest.raises(QEMUGoneError):
            core.read(h, 0, 4096)
        assert core.gone_reason is not None
    run(go())


def test_freeze_open_during_another_snapshot(guest: FakeGuest, clock: FakeClock) -> None:
    """A --freeze open that starts while another open's snapshot (QEMU's dump,
    which stops the guest for its duration) runs still pauses the guest."""
    async def go() -> None:
        core = make(guest, clock, freeze=True)
        gate = guest.gate = asyncio.Event()
        first = asyncio.create_task(core.open("vmcoreinfo"))      # no freeze: only a snapshot
        while guest.calls[-1:] != ["snapshot"]:
            await asyncio.sleep(0)
        assert guest.status_value == "paused"                    # the dump's stop
        second = asyncio.create_task(core.open("vmcore"))
        for _ in range(20):
            await asyncio.sleep(0)
        guest.gate = None
        gate.set()
        a, b = await first, await second
        assert guest.status_value == "paused" and core.paused_by_us  # frozen, not left running
        await core.release(b)
        await core.release(a)
        assert guest.status_value == "running"
    run(go())
