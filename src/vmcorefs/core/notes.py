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
