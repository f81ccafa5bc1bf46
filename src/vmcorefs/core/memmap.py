"""Guest-physical memory map model, from QEMU's ``info mtree -f``.

``info mtree -f`` prints every FlatView; the one listing ``AS "memory"`` is
the guest-physical address space QEMU's ``dump-guest-memory`` walks.  Each
range line looks like::

      0000000000100000-000000000fffffff (prio 0, ram): mem0 @0000000000100000 KVM

i.e. ``START-LAST (prio P, TYPE): NAME [@OFFSET_IN_REGION] [KVM]`` with an
inclusive LAST.  TYPE is ``ram``, ``rom`` (read-only RAM), ``romd``,
``ramd`` (RAM device) or ``i/o``, with an ``nv-`` prefix for non-volatile
regions.

The dump (QEMU ``softmmu/memory_mapping.c``, guest_phys_blocks) keeps RAM
sections that are neither RAM devices nor non-volatile and joins a section
to its predecessor when both are contiguous in guest-physical *and*
host-virtual memory and belong to the same memory region.
:func:`guest_phys_blocks` applies the same rule, given each range's host
address from HMP ``gpa2hva``.  Of a region with a RAM discard manager
(virtio-mem) the dump keeps only the populated (plugged) parts, which no
monitor command lists: :func:`dumped_blocks` takes them from the dump's
PT_LOADs, :func:`clip_virtio_mem` does what ``query-memory-devices``
allows without a dump.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Sequence

from vmcorefs.errors import FormatError

#: Types whose memory ``dump-guest-memory`` includes (memory_region_is_ram).
DUMPED_TYPES = frozenset({"ram", "rom"})

#: Bounds on hostile or absurd monitor output.
MAX_MTREE_CHARS = 16 << 20
MAX_RANGES = 65536

_AS_RE = re.compile(r'^\s*AS "(?P<name>[^"]*)"')
_RANGE_RE = re.compile(
    r"^\s*(?P<start>[0-9a-fA-F]{1,16})-(?P<last>[0-9a-fA-F]{1,16})\s+"
    r"\(prio\s+-?\d+,\s*(?P<type>[a-z/-]+)\):\s*(?P<name>.*?)"
    r"(?:\s+@(?P<off>[0-9a-fA-F]{1,16}))?(?:\s+KVM)?\s*$"
)


@dataclass(frozen=True)
class FlatRange:
    """One line of a FlatView: ``[start, end)`` of memory region ``name``."""

    start: int
    end: int
    type: str
    name: str
    offset_in_region: int

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def dumped(self) -> bool:
        """Would ``dump-guest-memory`` include this range (RAM, not nv/ramd)?"""
        return self.type in DUMPED_TYPES


@dataclass(frozen=True)
class GuestPhysBlock:
    """A guest-physical block as QEMU's dump sees it (one PT_LOAD): QEMU's
    ``GuestPhysBlock`` (include/sysemu/memory_mapping.h), whose
    ``target_start``/``target_end``/``host_addr``/``mr`` are ``gpa``,
    ``end``, ``hva`` and ``name`` here.

    ``gpa``, ``size``: bytes of guest-physical memory; ``hva`` the QEMU
    host-virtual address of ``gpa``; ``kind`` is ``ram`` or ``rom`` (the
    type of its first range); ``name`` its memory region.
    """

    gpa: int
    size: int
    hva: int
    name: str
    kind: str

    @property
    def end(self) -> int:
        return self.gpa + self.size


def parse_mtree_flat(text: str, address_space: str = "memory") -> list[FlatRange]:
    """Return the ranges of the FlatView serving ``address_space``.

    Raises :class:`FormatError` when the text has no such FlatView or holds
    a malformed, overlapping or unsorted range line.
    """
    if len(text) > MAX_MTREE_CHARS:
        raise FormatError(f"'info mtree -f' output too large ({len(text)} characters)")
    ranges: list[FlatRange] | None = None
    in_view_names: list[str] = []
    collecting = False
    for line in text.splitlines():
        if line.startswith("FlatView #"):
            if ranges is not None:
                break
            in_view_names = []
            collecting = False
            continue
        m = _AS_RE.match(line)
        if m:
            in_view_names.append(m.group("name"))
            continue
        if line.strip().startswith("Root memory region"):
            collecting = address_space in in_view_names
            if collecting:
                ranges = []
            continue
        if not collecting or ranges is None or not line.strip():
            continue
        if line.strip() == "No rendered FlatView":
            continue
        r = _RANGE_RE.match(line)
        if not r:
            raise FormatError(f"unparsable 'info mtree -f' line: {line.strip()[:120]!r}")
        start, last = int(r.group("start"), 16), int(r.group("last"), 16)
        if last < start:
            raise FormatError(f"'info mtree -f' range ends before it starts: {line.strip()[:120]!r}")
        if ranges and start < ranges[-1].end:
            raise FormatError(f"'info mtree -f' ranges overlap or are unsorted at {start:#x}")
        if len(ranges) >= MAX_RANGES:
            raise FormatError(f"'info mtree -f' lists more than {MAX_RANGES} ranges")
        ranges.append(
            FlatRange(
                start=start,
                end=last + 1,
                type=r.group("type"),
                name=r.group("name"),
                offset_in_region=int(r.group("off") or "0", 16),
            )
        )
    if ranges is None:
        raise FormatError(f'no FlatView for address space "{address_space}" in \'info mtree -f\'')
    return ranges


def guest_phys_blocks(ranges: list[tuple[FlatRange, int]]) -> list[GuestPhysBlock]:
    """Join dumped ranges into blocks, as QEMU's dump does.

    ``ranges`` pairs each dumped :class:`FlatRange` (sorted by address) with
    its host-virtual address.  A range extends its predecessor when it starts
    where the predecessor ends, continues it in host memory, and belongs to
    the same memory region.
    """
    blocks: list[GuestPhysBlock] = []
    for fr, hva in ranges:
        if blocks:
            prev = blocks[-1]
            if prev.end == fr.start and prev.hva + prev.size == hva and prev.name == fr.name:
                blocks[-1] = GuestPhysBlock(prev.gpa, prev.size + fr.size, prev.hva, prev.name, prev.kind)
                continue
        blocks.append(GuestPhysBlock(fr.start, fr.size, hva, fr.name, fr.type))
    return blocks


_GPA2HVA_RE = re.compile(r"^Host virtual address for 0x[0-9a-fA-F]+ \((?P<name>.*)\) is 0x(?P<hva>[0-9a-fA-F]+)\s*$")


def parse_gpa2hva(text: str) -> int:
    """Parse HMP ``gpa2hva`` output, e.g. ``Host virtual address for 0x0 (mem0) is 0x7f...``.

    Raises :class:`FormatError` carrying QEMU's own message otherwise (for
    example ``Memory at address 0x... is not RAM``).
    """
    m = _GPA2HVA_RE.match(text.strip())
    if not m:
        raise FormatError(text.strip()[:200] or "empty gpa2hva answer")
    return int(m.group("hva"), 16)


def dumped_blocks(blocks: list[GuestPhysBlock], loads: Sequence[tuple[int, int]]) -> list[GuestPhysBlock]:
    """The blocks QEMU's dump actually wrote: ``loads`` (its PT_LOADs,
    ``(p_paddr, p_memsz)``) placed in ``blocks`` (from ``info mtree -f``).

    ``info mtree -f`` shows a sparse region -- virtio-mem, whose RAM discard
    manager knows which blocks the guest has plugged -- whole, while the dump
    (QEMU ``guest_phys_blocks_region_add``) keeps only its populated parts.
    Each load becomes one block with the ``hva``, ``name`` and ``kind`` of the
    block holding it; blocks without a load are left out.  Sorted by ``gpa``.
    Raises :class:`FormatError` when a load lies in no single block (the map
    changed between the two answers, e.g. a DIMM was plugged).
    """
    starts = [b.gpa for b in blocks]
    out: list[GuestPhysBlock] = []
    for paddr, size in sorted(loads):
        i = bisect.bisect_right(starts, paddr) - 1
        if size <= 0 or i < 0 or paddr + size > blocks[i].end:
            raise FormatError(f"QEMU's dump has a PT_LOAD [{paddr:#x}, {paddr + size:#x}) outside the memory map")
        b = blocks[i]
        out.append(GuestPhysBlock(paddr, size, b.hva + (paddr - b.gpa), b.name, b.kind))
    return out


@dataclass(frozen=True)
class VirtioMem:
    """A virtio-mem device as QMP ``query-memory-devices`` describes it:
    ``memaddr`` (guest-physical start), ``size`` (bytes plugged now),
    ``max_size`` (bytes of its region), ``block_size`` (plug granularity)."""

    id: str
    memaddr: int
    size: int
    max_size: int
    block_size: int

    @property
    def end(self) -> int:
        return self.memaddr + self.max_size


def parse_virtio_mem(devices: Any) -> list[VirtioMem]:
    """The virtio-mem devices of a ``query-memory-devices`` answer (a list of
    ``{"type": ..., "data": {...}}``).  Raises :class:`FormatError` when one
    lacks a field or its numbers are not integers."""
    out: list[VirtioMem] = []
    if not isinstance(devices, list):
        raise FormatError("query-memory-devices did not return a list")
    for dev in devices:
        if not isinstance(dev, dict) or dev.get("type") != "virtio-mem":
            continue
        data = dev.get("data")
        data = data if isinstance(data, dict) else {}
        fields = [data.get(k) for k in ("memaddr", "size", "max-size", "block-size")]
        numbers = [v for v in fields if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
        if len(numbers) != len(fields):
            raise FormatError(f"query-memory-devices: malformed virtio-mem entry {str(dev)[:200]}")
        out.append(VirtioMem(str(data.get("id", "")), *numbers))
    return out


def clip_virtio_mem(blocks: list[GuestPhysBlock], devices: Sequence[VirtioMem]) -> tuple[list[GuestPhysBlock], list[VirtioMem]]:
    """``blocks`` without the virtio-mem regions that hold nothing, when the
    plugged blocks cannot be asked of QEMU's dump (a libvirt domain).

    ``query-memory-devices`` gives a device's plugged *size*, not which
    blocks: a device with nothing plugged is left out (exact), a fully
    plugged one kept whole (exact); a partly plugged one is kept whole --
    its unplugged blocks read as zeros.  Returns the blocks and the partly
    plugged devices (where the map is larger than QEMU's dump).
    """
    empty = [d for d in devices if d.size == 0]
    partial = [d for d in devices if 0 < d.size < d.max_size]
    kept = [b for b in blocks if not any(d.memaddr <= b.gpa and b.end <= d.end for d in empty)]
    return kept, partial
