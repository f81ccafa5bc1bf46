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
* :func:`resident_pages`: which pages of an open file are in the host's
  page cache (``mincore``), for tests of the cached read mode.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

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


def kernel_image_phys(vmcoreinfo: dict[str, str], symbol: str) -> int:
    """Guest-physical address of a kernel-image symbol named in VMCOREINFO."""
    vaddr = int(vmcoreinfo[f"SYMBOL({symbol})"], 16)
    phys_base = int(vmcoreinfo["NUMBER(phys_base)"]) & 0xFFFFFFFFFFFFFFFF
    return (vaddr - START_KERNEL_MAP + phys_base) & 0xFFFFFFFFFFFFFFFF


def printk_head_addr(vmcoreinfo: dict[str, str]) -> int:
    """Guest-physical address of ``printk_rb_static.desc_ring.head_id``,
    which moves with every kernel message."""
    off = (int(vmcoreinfo["OFFSET(printk_ringbuffer.desc_ring)"])
           + int(vmcoreinfo["OFFSET(prb_desc_ring.head_id)"]))
    return kernel_image_phys(vmcoreinfo, "printk_rb_static") + off


def printk_head_id(pmem_path: Path, vmcoreinfo: dict[str, str]) -> int:
    """The printk ring's head id, read from ``pmem`` (one open and one read)."""
    with open(pmem_path, "rb") as f:
        f.seek(printk_head_addr(vmcoreinfo))
        return int(struct.unpack("<Q", f.read(8))[0])


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(fd: int) -> int:
    """How many pages of the open file ``fd`` are in the host's page cache
    now: ``mincore`` of a read-only shared mapping of all of it (the
    mapping faults nothing in).  Counts this file only, whatever else the
    host caches."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        e = ctypes.get_errno()
        raise OSError(e, f"mmap: {os.strerror(e)}")
    try:
        vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        if _libc.mincore(addr, size, vec) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mincore: {os.strerror(e)}")
        return sum(b & 1 for b in vec.raw)
    finally:
        _libc.munmap(addr, size)
