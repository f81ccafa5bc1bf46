"""C structs as named, frozen records (the pyelftools way: fields named as in the spec).

A record class lists its fields in struct order and its layout in ``STRUCT``
(a little-endian :class:`struct.Struct`)::

    @dataclass(frozen=True)
    class Elf64_Phdr(CStruct):
        STRUCT = struct.Struct("<IIQQQQQQ")
        p_type: int
        ...

    Elf64_Phdr(p_type=PT_LOAD, ...).pack()          -> 56 bytes
    Elf64_Phdr.unpack_from(buf, offset)             -> Elf64_Phdr(...)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self


@dataclass(frozen=True)
class CStruct:
    """Base of the struct records; subclasses are frozen dataclasses."""

    STRUCT: ClassVar[struct.Struct]

    def values(self) -> list[Any]:
        """The field values in struct order."""
        return [getattr(self, f.name) for f in fields(self)]

    def pack(self) -> bytes:
        """The struct's bytes; ``struct.error`` when a value does not fit its field."""
        return self.STRUCT.pack(*self.values())

    @classmethod
    def unpack_from(cls, buffer: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        """The record at ``offset`` of ``buffer``; ``struct.error`` when it is too short."""
        return cls(*cls.STRUCT.unpack_from(buffer, offset))

    @classmethod
    def size(cls) -> int:
        """Bytes of the struct."""
        return cls.STRUCT.size
