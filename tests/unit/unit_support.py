"""Helpers for the unit tests: materialising sparse files, fake notes, tools."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from vmcorefs.core.layout import ExtentKind, SparseFile

DATA = Path(__file__).resolve().parent / "data"


def fake_mem_byte(gpa: int) -> int:
    """The byte a fake guest holds at guest-physical ``gpa``."""
    return (gpa * 7 + 3) & 0xFF


_PERIOD = bytes(fake_mem_byte(g) for g in range(256))  # the pattern repeats every 256


def fake_mem(gpa: int, length: int) -> bytes:
    """``length`` bytes of fake guest memory from ``gpa`` (fake_mem_byte each)."""
    start = gpa % 256
    reps = (start + length) // 256 + 1
    return (_PERIOD * reps)[start:start + length]


def materialise(sf: SparseFile) -> bytes:
    """The whole file, built byte by byte from its definition (not extents)."""
    out = bytearray(sf.size)
    out[: len(sf.prefix)] = sf.prefix
    for seg in sf.segments:
        out[seg.offset : seg.end] = fake_mem(seg.src, seg.length)
    return bytes(out)


def read_via_extents(sf: SparseFile, offset: int, length: int) -> bytes:
    """What the FUSE adapter returns for read(offset, length)."""
    parts = []
    for ext in sf.extents(offset, length):
        if ext.kind == ExtentKind.PREFIX:
            parts.append(sf.prefix[ext.src : ext.src + ext.length])
        elif ext.kind == ExtentKind.MEMORY:
            parts.append(fake_mem(ext.src, ext.length))
        else:
            assert ext.kind == ExtentKind.ZERO
            parts.append(bytes(ext.length))
    return b"".join(parts)


def write_sparse(sf: SparseFile, path: Path) -> None:
    """Write ``sf`` to ``path``: prefix and memory bytes, holes elsewhere."""
    with open(path, "wb") as f:
        f.write(sf.prefix)
        for seg in sf.segments:
            f.seek(seg.offset)
            f.write(fake_mem(seg.src, seg.length))
        f.truncate(sf.size)


NHDR = struct.Struct("<III")


def encode_note(name: bytes, ntype: int, desc: bytes, namesz: int | None = None,
                descsz: int | None = None) -> bytes:
    """One ELF note; ``name`` without its NUL (added), 4-byte padding."""
    raw_name = name + b"\0"
    n = len(raw_name) if namesz is None else namesz
    d = len(desc) if descsz is None else descsz
    return NHDR.pack(n, d, ntype) + _pad4(raw_name) + _pad4(desc)


def _pad4(b: bytes) -> bytes:
    return b + bytes(-len(b) % 4)


def fake_cpu_notes(ncpus: int, vmcoreinfo: bytes | None = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\n") -> bytes:
    """Notes shaped like QEMU's x86_64 dump: CORE/NT_PRSTATUS + QEMU per vCPU."""
    out = b"".join(encode_note(b"CORE", 1, bytes([i]) * 336) for i in range(ncpus))
    out += b"".join(encode_note(b"QEMU", 0, bytes([0x40 + i]) * 440) for i in range(ncpus))
    if vmcoreinfo is not None:
        out += encode_note(b"VMCOREINFO", 0, vmcoreinfo)
    return out


def require_tool(path: str) -> str:
    """``path`` if it is an executable; otherwise skip, or fail under CI=true."""
    if os.access(path, os.X_OK):
        return path
    found = shutil.which(os.path.basename(path))
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{path} is required under CI=true but is not installed")
    pytest.skip(f"{path} not installed")
