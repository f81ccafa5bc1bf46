"""The native read engine (vmcorefs._readpath) without FUSE.

A stream socket stands in for /dev/fuse (requests in, replies out, framed by
their headers) and a SOCK_SEQPACKET pair for pyfuse3.  Replies are checked
byte for byte against the sparse-file model -- prefix, then memory extents,
zeros elsewhere, short at EOF -- for shared memory (a memfd: the splice
path) and private memory (this very process, read with process_vm_readv,
untouched pages answered from its pagemap), with hypothesis choosing
layouts and reads.  Struct layouts are <linux/fuse.h>'s.

The fallbacks (process_vm_readv or memfd_create refused) run in a
subprocess under a seccomp filter.  ``make sanitize`` runs this module
against an ASan+UBSan build of the extension: ``VMCOREFS_READPATH_BUILD``
names the directory that holds it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SANITIZED = os.environ.get("VMCOREFS_READPATH_BUILD")  # put first on vmcorefs.__path__ by conftest.py

from vmcorefs import readpath  # noqa: E402
from vmcorefs.core.layout import Extent, ExtentKind  # noqa: E402

# Under CI=true a missing native module fails (the import below) instead of skipping.
if not readpath.available() and os.environ.get("CI") != "true":
    pytest.skip("native read path not built", allow_module_level=True)
from vmcorefs import _readpath  # noqa: E402

FUSE_GETATTR, FUSE_READ, FUSE_INIT, FUSE_INTERRUPT = 3, 15, 26, 36
FUSE_INT_REQ_BIT = 1  # an interrupt's own unique: its request's | this (uniques step by 2)
FUSE_MAX_PAGES = 1 << 22
IN_HEADER = struct.Struct("<IIQQIIIHH")  # fuse_in_header
READ_IN = struct.Struct("<QQIIQII")  # fuse_read_in
OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")  # fuse_init_out
BUF = 4 << 20
MEM = 4 << 20  # bytes of each kind of backing memory


class Rig:
    """An engine between a fake kernel (``kernel``) and a fake pyfuse3 (``app``)."""

    def __init__(self, start: bool = True, deny: tuple[int, ...] = (), pid: int | None = None) -> None:
        self.kernel, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.app, app = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.kernel, dev):
            for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):
                try:
                    s.setsockopt(socket.SOL_SOCKET, force, BUF)
                except OSError:
                    s.setsockopt(socket.SOL_SOCKET, opt, BUF)
        self.events_r, events_w = os.pipe()
        self.fds = [dev.detach(), app.detach(), events_w]
        self.unique = 0
        # Shared memory: a memfd of random bytes with a hole in its middle.
        rnd = random.Random(7)
        self.memfd = os.memfd_create("engine-test", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEM)
        os.pwrite(self.memfd, rnd.randbytes(MEM // 2), 0)
        os.pwrite(self.memfd, rnd.randbytes(MEM // 4), 3 * MEM // 4)
        self.shared = os.pread(self.memfd, MEM, 0)
        # Private memory: this process's, half written, half never touched.
        self.private = mmap.mmap(-1, MEM, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.private[: MEM // 2] = rnd.randbytes(MEM // 2)
        self.private_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.private))
        self.proc_mem = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
        if deny:
            deny_syscalls(*deny)
        self.engine = _readpath.Engine(self.fds[0], self.fds[1], events_w, os.getpid() if pid is None else pid)
        if start:
            self.engine.start()

    def request(self, opcode: int, body: bytes, nodeid: int = 2, unique: int | None = None) -> int:
        if unique is None:
            self.unique += 2  # as the kernel's: the low bit is FUSE_INT_REQ_BIT
            unique = self.unique
        self.kernel.sendall(IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid,
                                           0, 0, 0, 0, 0) + body)
        return unique

    def interrupt(self, unique: int) -> None:
        self.request(FUSE_INTERRUPT, struct.pack("<Q", unique), nodeid=0, unique=unique | FUSE_INT_REQ_BIT)

    def reply(self) -> tuple[int, int, bytes]:
        head = self._exact(OUT_HEADER.size)
        length, error, unique = OUT_HEADER.unpack(head)
        return unique, error, self._exact(length - OUT_HEADER.size)

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.kernel.recv(n - len(out))
            assert chunk, "engine closed the device"
            out += chunk
        return bytes(out)

    def read(self, fh: int, offset: int, size: int) -> tuple[int, bytes]:
        unique = self.request(FUSE_READ, READ_IN.pack(fh, offset, size, 0, 0, 0, 0))
        got_unique, error, data = self.reply()
        assert got_unique == unique
        return error, data

    def event(self) -> bytes:
        """The engine's next report (one byte; waits for it, a failure after 30 s)."""
        readable, _, _ = select.select([self.events_r], [], [], 30)
        assert readable, "no report from the engine"
        return os.read(self.events_r, 1)

    def close(self) -> None:
        self.engine.stop()
        for fd in [*self.fds, self.events_r, self.memfd, self.proc_mem]:
            os.close(fd)
        self.kernel.close()
        self.app.close()
        self.private.close()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


@st.composite
def layouts(draw: Any) -> tuple[bytes, list[tuple[int, int, int, int]], int]:
    """(prefix, [(offset, length, kind, source offset)], size)."""
    prefix = draw(st.binary(max_size=6000))
    pos = len(prefix)
    extents = []
    for _ in range(draw(st.integers(0, 6))):
        pos += draw(st.sampled_from([0, 1, 4096, 5000, 300_000]))
        length = draw(st.integers(1, 700_000))
        src = draw(st.integers(0, MEM - length))
        extents.append((pos, length, draw(st.integers(0, 1)), src))
        pos += length
    return prefix, extents, pos + draw(st.integers(0, 20_000))


def _model(rig: Rig, prefix: bytes, extents: list[tuple[int, int, int, int]], size: int) -> bytes:
    out = bytearray(size)
    out[: len(prefix)] = prefix
    for off, length, kind, src in extents:
        out[off:off + length] = (rig.shared if kind == 0 else rig.private)[src:src + length]
    return bytes(out)


_next_fh = iter(range(1000, 10**9))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts(), reads=st.lists(st.tuples(st.integers(0, 1 << 22), st.integers(0, (1 << 20) + 9000)),
                                        min_size=1, max_size=6))
def test_replies_match_the_model(rig: Rig, layout: tuple[bytes, list[tuple[int, int, int, int]], int],
                                 reads: list[tuple[int, int]]) -> None:
    prefix, extents, size = layout
    fh = next(_next_fh)
    rig.engine.register(fh, size, prefix, [
        Extent(off, length, ExtentKind.SHARED, src, rig.memfd) if kind == 0 else
        Extent(off, length, ExtentKind.PROCMEM, rig.private_addr + src, rig.proc_mem)
        for off, length, kind, src in extents])
    try:
        model = _model(rig, prefix, extents, size)
        for offset, want in reads:
            offset = offset % (size + 100)
            error, data = rig.read(fh, offset, want)
            assert error == 0
            n = max(0, min(want, _readpath.MAX_REPLY, size - offset))
            assert data == model[offset:offset + n], (offset, want)
    finally:
        assert rig.engine.unregister(fh)


def test_spliced_copied_and_counted(rig: Rig) -> None:
    """Shared memory and untouched private pages are spliced; private data copied."""
    before = rig.engine.stats()
    fh = next(_next_fh)
    rig.engine.register(fh, 3 * MEM, b"", [
        Extent(0, MEM, ExtentKind.SHARED, 0, rig.memfd),
        Extent(MEM, MEM // 2, ExtentKind.PROCMEM, rig.private_addr + MEM // 2, rig.proc_mem),
        Extent(2 * MEM, MEM // 2, ExtentKind.PROCMEM, rig.private_addr, rig.proc_mem)])
    size = (rig.engine.stats()["pipe_bytes"] // 4096 - 1) * 4096  # a reply that fits one pipe
    for off in (0, MEM, 2 * MEM):
        error, data = rig.read(fh, off, size)
        assert error == 0 and len(data) == size
    rig.engine.unregister(fh)
    after = rig.engine.stats()
    assert after["reads"] - before["reads"] == 3
    assert after["spliced"] - before["spliced"] == 2  # memfd, untouched private
    assert after["copied"] - before["copied"] == 1  # private data
    assert after["bytes"] - before["bytes"] == 3 * size
    assert after["process_vm_readv"] and after["zeros_memfd"]  # no fallback needed here


def test_other_requests_go_to_pyfuse3(rig: Rig) -> None:
    """Everything but READ of a registered handle reaches the app side verbatim,
    and what the app sends reaches the kernel."""
    unique = rig.request(FUSE_GETATTR, b"\0" * 16)
    msg = rig.app.recv(1 << 16)
    assert IN_HEADER.unpack_from(msg)[1:3] == (FUSE_GETATTR, unique)
    unique = rig.request(FUSE_READ, READ_IN.pack(424242, 0, 4096, 0, 0, 0, 0))  # unknown handle
    msg = rig.app.recv(1 << 16)
    assert IN_HEADER.unpack_from(msg)[1:3] == (FUSE_READ, unique)
    rig.app.send(OUT_HEADER.pack(OUT_HEADER.size + 5, 0, unique) + b"hello")
    assert rig.reply() == (unique, 0, b"hello")


def test_init_reply_max_pages_fits_the_pipe(rig: Rig) -> None:
    unique = rig.request(FUSE_INIT, b"\0" * 64, nodeid=0)
    assert IN_HEADER.unpack_from(rig.app.recv(1 << 16))[1] == FUSE_INIT
    out = INIT_OUT.pack(7, 38, 1 << 17, FUSE_MAX_PAGES, 12, 9, 1 << 20, 1, 256, 0, 0, *[0] * 7)
    rig.app.send(OUT_HEADER.pack(OUT_HEADER.size + len(out), 0, unique) + out)
    _, error, data = rig.reply()
    max_pages = INIT_OUT.unpack(data)[8]
    slots = rig.engine.stats()["pipe_bytes"] // 4096
    assert error == 0 and max_pages == min(256, slots - 1)
    assert rig.event() == b"R"  # libfuse accepted the connection


def test_refused_init_is_reported(rig: Rig) -> None:
    """libfuse's error reply to FUSE_INIT reaches the kernel as it is and is reported ('I'),
    once: a later message with the same unique is not an INIT reply."""
    unique = rig.request(FUSE_INIT, b"\0" * 64, nodeid=0)
    assert IN_HEADER.unpack_from(rig.app.recv(1 << 16))[1] == FUSE_INIT
    for _ in range(2):
        rig.app.send(OUT_HEADER.pack(OUT_HEADER.size, -errno.EPROTO, unique))
        assert rig.reply() == (unique, -errno.EPROTO, b"")
    assert rig.event() == b"I"
    os.set_blocking(rig.events_r, False)
    try:
        with pytest.raises(BlockingIOError):
            os.read(rig.events_r, 1)
    finally:
        os.set_blocking(rig.events_r, True)


def test_gone_fails_reads_with_eio() -> None:
    r = Rig()
    try:
        r.engine.register(1, 8192, b"x" * 100, [Extent(4096, 4096, ExtentKind.SHARED, 0, r.memfd)])
        assert r.read(1, 0, 8192) == (0, b"x" * 100 + bytes(3996) + r.shared[:4096])
        r.engine.set_gone()
        assert r.read(1, 0, 8192) == (-errno.EIO, b"")
    finally:
        r.close()


#: A process with private memory like Rig's (half random bytes, half never
#: touched); prints the memory's address.
_OTHER_QEMU = f"""
import ctypes, mmap, random, time
m = mmap.mmap(-1, {MEM}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:{MEM // 2}] = random.Random(3).randbytes({MEM // 2})
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
time.sleep(600)
"""


def test_handles_of_other_processes() -> None:
    """mount --all: an engine of no QEMU (pid 0) reads a handle registered
    with a pid from that process -- process_vm_readv, and its pagemap, so
    untouched pages are spliced as zeros (without the pid they are read and
    copied) -- and once it has exited fails that handle's reads with EIO,
    reporting nothing: the other handles read on."""
    other = subprocess.Popen([sys.executable, "-c", _OTHER_QEMU], stdout=subprocess.PIPE, text=True)
    r = Rig(pid=0)
    mem = -1
    try:
        assert other.stdout is not None
        addr = int(other.stdout.readline())
        mem = os.open(f"/proc/{other.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        data = random.Random(3).randbytes(MEM // 2)
        layout = [Extent(0, MEM, ExtentKind.PROCMEM, addr, mem)]
        r.engine.register(1, MEM, b"", layout, other.pid)
        r.engine.register(2, MEM, b"", layout)
        r.engine.register(3, MEM, b"", [Extent(0, MEM, ExtentKind.SHARED, 0, r.memfd)])
        size = (r.engine.stats()["pipe_bytes"] // 4096 - 1) * 4096  # a reply that fits one pipe
        for fh, spliced in ((1, 1), (2, 0)):
            before = r.engine.stats()
            assert r.read(fh, 0, 8192) == (0, data[:8192])
            assert r.read(fh, MEM // 2, size) == (0, bytes(size))
            after = r.engine.stats()
            assert after["spliced"] - before["spliced"] == spliced, fh
        other.kill()
        other.wait()
        assert r.read(1, 0, 8192) == (-errno.EIO, b"")
        assert r.read(3, 0, 8192) == (0, r.shared[:8192])
        os.set_blocking(r.events_r, False)
        with pytest.raises(BlockingIOError):
            os.read(r.events_r, 1)
    finally:
        other.kill()
        other.wait()
        if mem >= 0:
            os.close(mem)
        r.close()


def test_extent_kinds_are_python_s() -> None:
    """C's enum extent_kind has ExtentKind's numbers: register() takes Extents as they are."""
    assert {k.name: int(k) for k in ExtentKind} == {
        "PREFIX": _readpath.EXT_PREFIX, "ZERO": _readpath.EXT_ZERO, "MEMORY": _readpath.EXT_MEMORY,
        "SHARED": _readpath.EXT_SHARED, "PROCMEM": _readpath.EXT_PROCMEM}


@pytest.mark.parametrize("kind", [ExtentKind.PREFIX, ExtentKind.ZERO, ExtentKind.MEMORY, 7, -1])
def test_register_refuses_kinds_it_cannot_read(rig: Rig, kind: int) -> None:
    with pytest.raises(ValueError, match="kind"):
        rig.engine.register(5, 8192, b"", [(0, 4096, kind, 0, rig.memfd)])
    assert not rig.engine.unregister(5)


@pytest.mark.parametrize("extents", [
    [(0, 0, ExtentKind.SHARED, 0, 0)],  # empty
    [(4096, 4096, ExtentKind.SHARED, 0, 0), (0, 4096, ExtentKind.SHARED, 0, 0)],  # unsorted
    [(0, 4096, ExtentKind.SHARED, 0, 0), (4095, 4096, ExtentKind.SHARED, 0, 0)],  # overlapping
    [(4096, 8192, ExtentKind.SHARED, 0, 0)],  # beyond the file
    [(2**64 - 4096, 4096, ExtentKind.SHARED, 0, 0)],  # beyond, and wrapping
])
def test_register_refuses_bad_layouts(rig: Rig, extents: list[tuple[int, int, int, int, int]]) -> None:
    with pytest.raises(ValueError):
        rig.engine.register(6, 8192, b"", extents)
    assert not rig.engine.unregister(6)


def test_module_under_test() -> None:
    """The extension these tests drive: the sanitized build when asked for."""
    if SANITIZED:
        assert Path(_readpath.__file__).parent == Path(SANITIZED)


def test_interrupt_of_a_native_read_is_dropped(rig: Rig) -> None:
    """A FUSE_INTERRUPT of a read the engine answered stays out of libfuse; one of a
    request pyfuse3 serves reaches it, in order."""
    fh = next(_next_fh)
    rig.engine.register(fh, 8192, b"abc", [])
    before = rig.engine.stats()
    unique = rig.request(FUSE_READ, READ_IN.pack(fh, 0, 3, 0, 0, 0, 0))
    assert rig.reply() == (unique, 0, b"abc")
    # One request in flight at a time: the stand-in for /dev/fuse is a stream
    # socket, which (unlike the device) may hand two writes to one read.
    rig.interrupt(unique)
    deadline = time.monotonic() + 30
    while rig.engine.stats()["interrupts_dropped"] == before["interrupts_dropped"] and time.monotonic() < deadline:
        time.sleep(0.01)
    getattr_unique = rig.request(FUSE_GETATTR, b"\0" * 16)
    got = [IN_HEADER.unpack_from(rig.app.recv(1 << 16))[1:3]]
    rig.interrupt(getattr_unique)
    got.append(IN_HEADER.unpack_from(rig.app.recv(1 << 16))[1:3])
    assert got == [(FUSE_GETATTR, getattr_unique), (FUSE_INTERRUPT, getattr_unique | FUSE_INT_REQ_BIT)]
    # The engine counts a forwarded request after writing it: the message can be here before its count.
    while rig.engine.stats()["forwarded"] - before["forwarded"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    after = rig.engine.stats()
    assert after["interrupts_dropped"] - before["interrupts_dropped"] == 1
    assert after["forwarded"] - before["forwarded"] == 2
    assert rig.engine.unregister(fh)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _wait_threads(n: int) -> None:
    """Until this process has n threads: a joined thread may stay listed for a moment."""
    deadline = time.monotonic() + 30
    while _threads() != n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _threads() == n


@pytest.mark.parametrize("which,nth", [("device", 1), ("reply", 2)])
def test_failed_start_leaves_no_thread(which: str, nth: int) -> None:
    """When a thread cannot be created, start() fails with no thread left running (the
    device thread, when it is the reply thread that failed, is stopped and joined
    before the engine's buffers can be freed); the engine can start again."""
    r = Rig(start=False)
    try:
        threads = _threads()
        _readpath._fail_next_thread_create(nth)
        with pytest.raises(OSError, match=f"{which} thread"):
            r.engine.start()
        assert r.engine.stats()["threads"] == 0
        _wait_threads(threads)
        r.engine.start()
        assert r.engine.stats()["threads"] == 2
        _wait_threads(threads + 2)
        r.engine.register(1, 100, b"x" * 100, [])
        assert r.read(1, 0, 4096) == (0, b"x" * 100)
    finally:
        _readpath._fail_next_thread_create(0)
        r.close()
    _wait_threads(threads)


def test_failed_start_then_dealloc() -> None:
    """An engine whose start failed half-way is freed without a thread using its buffers
    (the ASan build of ``make sanitize`` would report the use after free)."""
    r = Rig(start=False)
    threads = _threads()
    _readpath._fail_next_thread_create(2)
    try:
        with pytest.raises(OSError):
            r.engine.start()
    finally:
        _readpath._fail_next_thread_create(0)
    r.kernel.sendall(IN_HEADER.pack(IN_HEADER.size + 16, FUSE_GETATTR, 2, 2, 0, 0, 0, 0, 0) + bytes(16))
    del r.engine  # Engine_dealloc
    _wait_threads(threads)
    for fd in [*r.fds, r.events_r, r.memfd, r.proc_mem]:
        os.close(fd)
    r.kernel.close()
    r.app.close()
    r.private.close()


# ---- Fallbacks, under seccomp in a subprocess -------------------------------

NR_PROCESS_VM_READV, NR_MEMFD_CREATE = 310, 319  # x86-64
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def deny_syscalls(*numbers: int) -> None:
    """Make ``numbers`` fail with EPERM in this thread and the threads it creates from now
    on (a seccomp filter: irrevocable, hence only in a subprocess)."""
    n = len(numbers)
    insns = [(BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
             (BPF_JEQ_K, 0, n + 1, AUDIT_ARCH_X86_64),
             (BPF_LD_W_ABS, 0, 0, 0)]  # seccomp_data.nr
    insns += [(BPF_JEQ_K, n - i, 0, nr) for i, nr in enumerate(numbers)]
    insns += [(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW), (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM)]
    prog = (_SockFilter * len(insns))(*[_SockFilter(*i) for i in insns])
    libc = ctypes.CDLL(None, use_errno=True)
    fprog = _SockFprog(len(insns), prog)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0):
        raise OSError(ctypes.get_errno(), "seccomp filter refused")


def _fallback_reads(deny: int) -> dict[str, int]:
    """Reads of every kind of piece with syscall ``deny`` refused: the bytes of the model."""
    r = Rig(deny=(deny,))
    try:
        assert _syscall_refused(deny)
        extents = [(8192, MEM, 0, 0), (8192 + MEM + 4096, MEM, 1, 0)]  # memfd; private, half untouched
        size = 8192 + 2 * MEM + 3 * 4096
        r.engine.register(1, size, b"P" * 5000, [
            Extent(off, length, ExtentKind.SHARED if kind == 0 else ExtentKind.PROCMEM,
                   src if kind == 0 else r.private_addr + src, r.memfd if kind == 0 else r.proc_mem)
            for off, length, kind, src in extents])
        model = _model(r, b"P" * 5000, extents, size)
        step = (r.engine.stats()["pipe_bytes"] // 4096 - 1) * 4096
        for off in [*range(0, size, step), 8192 + MEM + 4096 + MEM // 2, 4000]:
            assert r.read(1, off, step) == (0, model[off:off + step]), off
        return dict(r.engine.stats())
    finally:
        r.close()


def _syscall_refused(nr: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(nr, 0, 0, 0, 0, 0, 0) == -1 and ctypes.get_errno() == errno.EPERM


def fallback_process_vm_readv() -> None:
    stats = _fallback_reads(NR_PROCESS_VM_READV)
    assert stats["process_vm_readv"] == 0 and stats["copied"] > 0, stats


def fallback_memfd_create() -> None:
    stats = _fallback_reads(NR_MEMFD_CREATE)
    assert stats["zeros_memfd"] == 0 and stats["spliced"] > 0, stats


@pytest.mark.parametrize("check", ["fallback_process_vm_readv", "fallback_memfd_create"])
def test_fallbacks_give_the_same_bytes(check: str) -> None:
    """process_vm_readv refused: private RAM read from /proc/PID/mem; memfd_create refused:
    zeros vmspliced from a zero buffer.  Same bytes either way."""
    here = Path(__file__).parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import {Path(__file__).stem} as t; t.{check}()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
