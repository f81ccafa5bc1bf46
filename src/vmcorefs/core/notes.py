"""ELF note parsing and VMCOREINFO.

A PT_NOTE segment is a sequence of entries, each::

    Elf64_Nhdr { n_namesz, n_descsz, n_type }   three 32-bit words
    name[n_namesz]  padded to 4 bytes            e.g. "CORE\\0", "QEMU\\0"
    desc[n_descsz]  padded to 4 bytes

(Elf32_Nhdr and Elf64_Nhdr have the same layout.)  QEMU's x86 dump writes,
per vCPU, a ``CORE``/``NT_PRSTATUS`` note and a ``QEMU`` note (QEMUCPUState),
then a ``VMCOREINFO`` note whose desc is the guest's ``KEY=VALUE`` lines.
Guest-controlled sizes are bounded: a note that runs past the segment ends
parsing with :class:`FormatError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmcorefs.errors import FormatError

NHDR = struct.Struct("<III")
NT_PRSTATUS = 1
#: Bound on VMCOREINFO we interpret (QEMU caps guest notes at 1 MiB).
MAX_VMCOREINFO = 1 << 20
MAX_VMCOREINFO_KEYS = 10000


def _pad4(n: int) -> int:
    return (n + 3) & ~3


@dataclass(frozen=True)
class Note:
    """One ELF note: ``name`` without its NUL, ``type`` and ``desc`` bytes."""

    name: str
    type: int
    desc: bytes


def parse_notes(data: bytes) -> list[Note]:
    """Split PT_NOTE data into notes, checking every size against the data."""
    notes: list[Note] = []
    pos = 0
    while pos + NHDR.size <= len(data):
        namesz, descsz, ntype = NHDR.unpack_from(data, pos)
        name_off = pos + NHDR.size
        desc_off = name_off + _pad4(namesz)
        end = desc_off + _pad4(descsz)
        if desc_off + descsz > len(data):
            raise FormatError(f"ELF note at offset {pos:#x} claims {namesz}+{descsz} bytes past the segment end")
        name = data[name_off:name_off + namesz].split(b"\0", 1)[0].decode("ascii", "replace")
        notes.append(Note(name, ntype, bytes(data[desc_off:desc_off + descsz])))
        pos = end
    return notes


def vmcoreinfo_text(notes: list[Note]) -> str | None:
    """The VMCOREINFO note's text, or None when the guest published none."""
    for note in notes:
        if note.name == "VMCOREINFO":
            return note.desc[:MAX_VMCOREINFO].split(b"\0", 1)[0].decode("ascii", "replace")
    return None


def parse_vmcoreinfo(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines into a dict (first wins; bounded in count)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            continue
        out.setdefault(key, value.strip())
        if len(out) >= MAX_VMCOREINFO_KEYS:
            break
    return out


def count_cpus(notes: list[Note]) -> int:
    """Number of vCPUs: one ``CORE``/``NT_PRSTATUS`` note each."""
    return sum(1 for n in notes if n.name == "CORE" and n.type == NT_PRSTATUS)


#: x86 ``QEMUCPUState`` (QEMU target/i386/arch_dump.c), the desc of each
#: ``QEMU`` note: u32 version, u32 size, 16 GPRs, rip, rflags, then ten
#: QEMUCPUSegment {u32 selector, limit, flags, pad; u64 base} (cs first),
#: then u64 cr[5].
QEMU_CPUSTATE_CS_SELECTOR = 8 + 18 * 8
QEMU_CPUSTATE_CR = QEMU_CPUSTATE_CS_SELECTOR + 10 * 24
_CR = struct.Struct("<5Q")


@dataclass(frozen=True)
class X86CPUState:
    """What vmcorefs reads of a vCPU's ``QEMU`` note: privilege and CR3/CR4."""

    cs_selector: int
    cr3: int
    cr4: int

    @property
    def in_kernel(self) -> bool:
        return self.cs_selector & 3 == 0


def qemu_x86_cpu_states(notes: list[Note]) -> list[X86CPUState]:
    """The x86 ``QEMU`` notes' CR3/CR4 and CS, in vCPU order (short or
    foreign notes are skipped)."""
    out = []
    for note in notes:
        if note.name != "QEMU" or len(note.desc) < QEMU_CPUSTATE_CR + _CR.size:
            continue
        (selector,) = struct.unpack_from("<I", note.desc, QEMU_CPUSTATE_CS_SELECTOR)
        cr = _CR.unpack_from(note.desc, QEMU_CPUSTATE_CR)
        out.append(X86CPUState(selector, cr[3], cr[4]))
    return out
