"""What tests, benchmarks and the demo read from a mounted guest.

* :data:`DRGN_KALLSYMS`: the drgn program without debuginfo (symbols from
  the guest's own kallsyms, found through VMCOREINFO), run as
  ``python -c DRGN_KALLSYMS CORE [SYMBOL...]``: prints ``linux_banner``,
  then ``SYMBOL VALUE`` (its first 8 bytes, little-endian) per extra symbol.
  :data:`DRGN_KALLSYMS_QEMU` is the same through drgn's own live QEMU mode
  (``Program.set_qemu_qmp``, drgn >= 0.0.31) on a QMP socket.
* VMCOREINFO arithmetic: a kernel-image symbol's guest-physical address,
  the printk ring's head id (it moves with every kernel message; the test
  guest writes ten a second).
* :func:`memory_cgroup`: the page cache this process brought in (not the
  host's ``Cached``, which every other process moves), for tests of the
  cached read mode.
* :data:`BUSY_LOOP` and :func:`pause_with_a_user_vcpu`: an x86 guest paused
  with one vCPU in user mode and one in the kernel (notes tests, captures).
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from vmcorefs.testing.guests import QemuGuest, require

DRGN_KALLSYMS = r"""
import sys, drgn
from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms
prog = drgn.Program()
prog.set_core_dump(sys.argv[1])
prog.register_symbol_finder("vmlinux_kallsyms", load_vmlinux_kallsyms(prog), enable_index=0)
print(prog.read(prog.symbol("linux_banner").address, 200).split(b"\0")[0].decode())
for name in sys.argv[2:]:
    print(name, int.from_bytes(prog.read(prog.symbol(name).address, 8), "little"))
"""
DRGN_KALLSYMS_QEMU = DRGN_KALLSYMS.replace("prog.set_core_dump(sys.argv[1])", "prog.set_qemu_qmp(sys.argv[1])")

#: Linux's __START_KERNEL_map (x86_64): kernel image virtual = physical + this - phys_base.
START_KERNEL_MAP = 0xFFFFFFFF80000000


def vmcoreinfo_dict(text: str) -> dict[str, str]:
    """VMCOREINFO's ``KEY=VALUE`` lines as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def image_phys(vmcoreinfo: dict[str, str], vaddr: int) -> int:
    """Guest-physical address of a kernel-image virtual address (x86_64:
    ``__START_KERNEL_map`` + phys_base)."""
    phys_base = int(vmcoreinfo["NUMBER(phys_base)"]) & 0xFFFFFFFFFFFFFFFF
    return (vaddr - START_KERNEL_MAP + phys_base) & 0xFFFFFFFFFFFFFFFF


def kernel_image_phys(vmcoreinfo: dict[str, str], symbol: str) -> int:
    """Guest-physical address of a kernel-image symbol named in VMCOREINFO."""
    return image_phys(vmcoreinfo, int(vmcoreinfo[f"SYMBOL({symbol})"], 16))


def printk_head_addr(vmcoreinfo: dict[str, str], pmem_path: Path) -> int:
    """Guest-physical address of the printk ring's ``desc_ring.head_id``,
    which moves with every kernel message: of ``*prb``, the ring in use
    (``printk_rb_static`` until ``log_buf_len=`` makes the kernel switch to
    ``printk_rb_dynamic``, also in the kernel image), read from ``pmem``."""
    off = (int(vmcoreinfo["OFFSET(printk_ringbuffer.desc_ring)"])
           + int(vmcoreinfo["OFFSET(prb_desc_ring.head_id)"]))
    if "SYMBOL(prb)" not in vmcoreinfo:
        return kernel_image_phys(vmcoreinfo, "printk_rb_static") + off
    with open(pmem_path, "rb") as f:
        f.seek(kernel_image_phys(vmcoreinfo, "prb"))
        ring = int(struct.unpack("<Q", f.read(8))[0])
    return image_phys(vmcoreinfo, ring) + off


def printk_head_id(pmem_path: Path, vmcoreinfo: dict[str, str]) -> int:
    """The printk ring's head id, read from ``pmem``."""
    addr = printk_head_addr(vmcoreinfo, pmem_path)
    with open(pmem_path, "rb") as f:
        f.seek(addr)
        return int(struct.unpack("<Q", f.read(8))[0])


def _memory_hierarchy() -> tuple[Path, Path, str] | None:
    """(this process's memory cgroup, where to make a child, the page-cache
    key of memory.stat), from cgroup v1's memory hierarchy or cgroup v2."""
    mounts: dict[str, tuple[str, Path]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, tail = line.partition(" - ")
            root, mountpoint = fields.split()[3:5]
            fstype, _, options = tail.split()[:3]
            if fstype == "cgroup" and "memory" in options.split(","):
                mounts.setdefault("v1", (root, Path(mountpoint)))
            elif fstype == "cgroup2":
                mounts.setdefault("v2", (root, Path(mountpoint)))
    with open("/proc/self/cgroup") as f:
        own = {controllers: path for _, controllers, path in (line.rstrip("\n").split(":", 2) for line in f)}

    def under(root: str, mountpoint: Path, path: str) -> Path:
        rel = path[len(root):] if root != "/" and path.startswith(root) else path
        return mountpoint / rel.lstrip("/")

    v1 = next((p for c, p in own.items() if "memory" in c.split(",")), None)
    if "v1" in mounts and v1 is not None:
        current = under(*mounts["v1"], v1)
        return current, current, "cache"
    if "v2" in mounts and "" in own:
        top = mounts["v2"][1]
        if "memory" in (top / "cgroup.subtree_control").read_text().split():
            return under(*mounts["v2"], own[""]), top, "file"
    return None


@contextlib.contextmanager
def memory_cgroup() -> Iterator[Callable[[], int]]:
    """Run the block in a new memory cgroup of its own (this process moves
    there and back, root only).  Yields a function that returns the bytes of
    page cache charged to that cgroup: pages this process brought into the
    host's page cache during the block that are still cached (``cache`` of
    cgroup v1's memory.stat, ``file`` of v2's).  Skips (fails under
    ``CI=true``; raises Unavailable outside pytest) where no memory cgroup
    can be made."""
    found = _memory_hierarchy()
    require(found is not None and os.geteuid() == 0, "no memory cgroup to make (needs root and cgroup memory)")
    assert found is not None
    current, parent, key = found
    cg = parent / f"vmcorefs-test-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "cgroup.procs").write_text(str(os.getpid()))

        def cached() -> int:
            with open(cg / "memory.stat") as f:
                return next(int(v) for k, v in (line.split() for line in f) if k == key)
        try:
            yield cached
        finally:
            (current / "cgroup.procs").write_text(str(os.getpid()))
    finally:
        with contextlib.suppress(OSError):
            cg.rmdir()


#: Bytes compared at a time by :func:`load_mismatches`.
COMPARE_CHUNK = 1 << 20


def load_mismatches(ours: BinaryIO, theirs: BinaryIO,
                    pairs: Iterable[tuple[int, int, int, int]]) -> list[int]:
    """Guest-physical addresses (one per differing 1 MiB chunk) where two
    cores' PT_LOADs differ: ``pairs`` of ``(p_paddr, p_memsz, p_offset in
    ours, p_offset in theirs)``.  Asserts that ``ours`` holds every byte."""
    out = []
    for paddr, size, off_o, off_t in pairs:
        for done in range(0, size, COMPARE_CHUNK):
            n = min(COMPARE_CHUNK, size - done)
            ours.seek(off_o + done)
            theirs.seek(off_t + done)
            a, b = ours.read(n), theirs.read(n)
            assert len(a) == n, f"short read of ours at {off_o + done:#x}"
            if a != b:
                out.append(paddr + done)
    return out


#: Typed on the console of a ``GuestSpec(console=True)`` guest: a shell busy
#: loop, so that a vCPU is often in user mode.
BUSY_LOOP = b"while :; do :; done &\n"


def pause_with_a_user_vcpu(guest: QemuGuest, tries: int = 300) -> str:
    """Pause the x86 ``guest`` at an instant where one vCPU is in user mode
    (CPL 3) and one in the kernel (CPL 0), trying up to ``tries`` times 0.1 s
    apart (run :data:`BUSY_LOOP` first).  Returns that instant's ``info
    registers -a``; the guest stays paused.  RuntimeError if none is caught
    (the guest is then running)."""
    for _ in range(tries):
        guest.qmp("stop")
        text = guest.hmp("info registers -a")
        cpls = re.findall(r" CPL=(\d)", text)
        if "3" in cpls and "0" in cpls:
            return text
        guest.qmp("cont")
        time.sleep(0.1)
    raise RuntimeError(f"guest {guest.spec.name}: no instant with a vCPU in user mode in {tries} tries")
