"""Synthetic guest memory holding an x86-64 kernel's page tables,
``init_uts_ns`` and VMCOREINFO copies, for the VMCOREINFO finder tests."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from paging_support import MiB2, PageTables, PhysMem

from vmcorefs.core.paging import START_KERNEL_MAP
from vmcorefs.core.layout import PAGE_SIZE
from vmcorefs.core.vmcoreinfo import NOTE_NAME, Finder
from vmcorefs.errors import GuestMemoryError

NHDR = struct.Struct("<III")
LIMIT = 1 << 30  # guest-physical memory of the synthetic images


class Image(PhysMem):
    """Sparse guest-physical memory: pages never written are holes (zeros,
    and never fed to the finder).  ``read`` takes any address and length."""

    def __init__(self) -> None:
        super().__init__(LIMIT)

    def read(self, addr: int, length: int) -> bytes:
        if not 0 <= addr < self.limit:
            raise GuestMemoryError("outside the image", addr)
        length = min(length, self.limit - addr)
        self.reads.append(addr)
        out = bytearray()
        pos = addr
        while pos < addr + length:
            base = pos - pos % PAGE_SIZE
            n = min(base + PAGE_SIZE, addr + length) - pos
            page = self.pages.get(base)
            out += page[pos - base:pos - base + n] if page is not None else bytes(n)
            pos += n
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            a = addr + pos
            n = min(PAGE_SIZE - a % PAGE_SIZE, len(data) - pos)
            self.page(a)[a % PAGE_SIZE:a % PAGE_SIZE + n] = data[pos:pos + n]
            pos += n

    def hole(self, addr: int) -> None:
        self.pages.pop(addr - addr % PAGE_SIZE, None)

    def feed(self, finder: Finder, chunk: int = 16 * PAGE_SIZE, order: random.Random | None = None) -> None:
        """Feed the populated pages, in runs of at most ``chunk`` bytes
        (in address order, or shuffled with ``order``)."""
        runs: list[tuple[int, bytearray]] = []
        for base in sorted(self.pages):
            if runs and runs[-1][0] + len(runs[-1][1]) == base and len(runs[-1][1]) < chunk:
                runs[-1][1].extend(self.pages[base])
            else:
                runs.append((base, bytearray(self.pages[base])))
        if order is not None:
            order.shuffle(runs)
        for gpa, data in runs:
            finder.feed(data, gpa)


@dataclass(frozen=True)
class Kernel:
    """A synthetic x86-64 kernel: image at guest-physical ``load`` (where
    ``_stext`` is), KASLR offset ``koff``; what Linux writes in VMCOREINFO."""

    release: str = "6.1.0-57-cloud-amd64"
    koff: int = 0x2A00000
    load: int = 0x4000000
    levels: int = 4
    uts_layout: str = "6.1"  # "6.1": name at 0, OFFSET key; "old": kref first, no key
    extra: str = ""

    @property
    def stext(self) -> int:
        return START_KERNEL_MAP + 0x1000000 + self.koff

    @property
    def phys_base(self) -> int:
        return self.load - (self.stext - START_KERNEL_MAP)

    def va(self, pa: int) -> int:
        return self.stext + (pa - self.load)


@dataclass
class Booted:
    kernel: Kernel
    text: str
    root: int


def uts_namespace(k: Kernel) -> bytes:
    name = b"".join(s.encode().ljust(65, b"\0") for s in ("Linux", "(none)", k.release, "#1 SMP", "x86_64", "(none)"))
    return (b"\x01\0\0\0" + name) if k.uts_layout == "old" else name


def boot(img: Image, k: Kernel) -> Booted:
    """Map the kernel image (16 MiB of 2 MiB pages) with page tables that
    live inside it, write init_uts_ns, and return the VMCOREINFO text."""
    pt = PageTables(img, levels=k.levels, table_base=k.load + 0x400000)
    for i in range(8):
        assert pt.map(k.stext + i * MiB2, k.load + i * MiB2, MiB2)
    uts_pa = k.load + 0x200000 + 0x1A0
    img.write(uts_pa, uts_namespace(k))
    lines = [
        f"OSRELEASE={k.release}",
        "BUILD-ID=0123456789abcdef0123456789abcdef01234567",
        "PAGESIZE=4096",
        f"SYMBOL(init_uts_ns)={k.va(uts_pa):x}",
        *(["OFFSET(uts_namespace.name)=0"] if k.uts_layout == "6.1" else []),
        "SYMBOL(node_online_map)=ffffffff82b0e0c8",
        f"SYMBOL(swapper_pg_dir)={k.va(pt.root):x}",
        f"SYMBOL(_stext)={k.stext:x}",
        "SIZE(page)=64",
        "OFFSET(page.flags)=0",
        "LENGTH(zone.free_area)=11",
        "NUMBER(PG_lru)=4",
        f"NUMBER(phys_base)={k.phys_base}",
        f"SYMBOL(init_top_pgt)={k.va(pt.root):x}",
        f"NUMBER(pgtable_l5_enabled)={int(k.levels == 5)}",
        f"KERNELOFFSET={k.koff:x}",
        "NUMBER(KERNEL_IMAGE_SIZE)=1073741824",
        "NUMBER(sme_mask)=0",
    ]
    text = "\n".join(lines) + "\n" + k.extra
    return Booted(k, text, pt.root)


def note_bytes(text: str | bytes, namesz: int = 11, ntype: int = 0, descsz: int | None = None,
               final: bool = True) -> bytes:
    desc = text.encode() if isinstance(text, str) else text
    d = len(desc) if descsz is None else descsz
    out = NHDR.pack(namesz, d, ntype) + NOTE_NAME + b"\0" + desc + bytes(-len(desc) % 4)
    return out + (bytes(12) if final else b"\xff" * 12)


def put_pair(img: Image, b: Booted, note: int, text: int) -> None:
    img.write(note, note_bytes(b.text))
    img.write(text, b.text.encode())




@dataclass(frozen=True)
class CPU:
    """What the finder needs of a vCPU (CR3, CR4, privilege)."""

    cr3: int
    cr4: int = 0x6B0
    in_kernel: bool = True
