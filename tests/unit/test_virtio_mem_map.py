"""virtio-mem in the memory map: the dump's PT_LOADs placed in ``info mtree -f``'s
blocks (dumped_blocks), how much of a dump's start holds its headers and notes
(qemu_dump_headers_end), and the libvirt fallback from ``query-memory-devices``
(parse_virtio_mem, clip_virtio_mem).  tests/integration/test_virtio_mem.py
checks the same against real QEMU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unit_support import DATA

from vmcorefs.core.elf import parse_qemu_dump, qemu_dump_headers_end
from vmcorefs.core.memmap import (
    GuestPhysBlock,
    VirtioMem,
    clip_virtio_mem,
    dumped_blocks,
    parse_virtio_mem,
)
from vmcorefs.errors import FormatError

MiB, GiB = 1 << 20, 1 << 30
SAMPLES = [DATA / n for n in ("qemu72-onebyte-dump.elf", "qemu72-reset-em386-onebyte-dump.elf",
                              "qemu100-x86-busy-onebyte-dump.elf")]

# The map of the integration test's guest: 512 MiB of mem0, the BIOS, and a
# 2 GiB virtio-mem region at 4 GiB (info mtree -f shows it whole).
MEM0 = GuestPhysBlock(0, 512 * MiB, 0x7F0000000000, "mem0", "ram")
BIOS = GuestPhysBlock(0xFFFC0000, 0x40000, 0x7E0000000000, "pc.bios", "rom")
VMEM = GuestPhysBlock(4 * GiB, 2 * GiB, 0x7D0000000000, "vmem0", "ram")
MAP = [MEM0, BIOS, VMEM]
# query-memory-devices as QEMU 7.2 answers it (size: bytes plugged now).
ANSWER = [{"type": "virtio-mem", "data": {
    "memdev": "/objects/vmem0", "memaddr": 4 * GiB, "block-size": 2 * MiB, "size": 0, "node": 0,
    "max-size": 2 * GiB, "requested-size": 0, "id": "vm0"}}]


# --- qemu_dump_headers_end ----------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_headers_end_of_real_dumps(sample: Path) -> None:
    data = sample.read_bytes()
    end = qemu_dump_headers_end(data)
    assert end is not None and end < len(data)  # the sampled byte of RAM comes after
    # Every shorter prefix is "not yet", every longer one says the same end.
    for n in range(0, end):
        assert qemu_dump_headers_end(data[:n]) is None, n
    assert qemu_dump_headers_end(data[:end + 1]) == end
    assert parse_qemu_dump(data[:end]) == parse_qemu_dump(data)
    with pytest.raises(FormatError):
        parse_qemu_dump(data[:end - 1])


def test_loads_of_a_real_one_byte_dump() -> None:
    # QEMU 7.2 with begin=1 MiB, length=1: one PT_LOAD of one byte.
    assert parse_qemu_dump(SAMPLES[0].read_bytes()).loads == ((1 * MiB, 1),)


def test_headers_end_rejects_what_is_not_a_dump() -> None:
    with pytest.raises(FormatError):
        qemu_dump_headers_end(b"MZ" + bytes(100))
    assert qemu_dump_headers_end(b"\x7fELF") is None


# --- dumped_blocks ------------------------------------------------------------------

TABLE = {
    # nothing plugged: the virtio-mem region is not dumped at all
    "unplugged": ([(0, 512 * MiB), (0xFFFC0000, 0x40000)], [MEM0, BIOS]),
    # 256 MiB plugged at its start
    "first-256M": ([(0, 512 * MiB), (0xFFFC0000, 0x40000), (4 * GiB, 256 * MiB)],
                   [MEM0, BIOS, GuestPhysBlock(4 * GiB, 256 * MiB, VMEM.hva, "vmem0", "ram")]),
    # two plugged runs with a hole (and the dump's order is not ours)
    "two-runs": ([(4 * GiB + 6 * MiB, 2 * MiB), (0, 512 * MiB), (4 * GiB, 2 * MiB)],
                 [MEM0,
                  GuestPhysBlock(4 * GiB, 2 * MiB, VMEM.hva, "vmem0", "ram"),
                  GuestPhysBlock(4 * GiB + 6 * MiB, 2 * MiB, VMEM.hva + 6 * MiB, "vmem0", "ram")]),
    # fully plugged: the region whole, as info mtree -f shows it
    "full": ([(0, 512 * MiB), (0xFFFC0000, 0x40000), (4 * GiB, 2 * GiB)], MAP),
}


@pytest.mark.parametrize("name", TABLE)
def test_dumped_blocks_table(name: str) -> None:
    loads, expected = TABLE[name]
    assert dumped_blocks(MAP, loads) == expected


@pytest.mark.parametrize("load", [
    (6 * GiB, 2 * MiB),                  # after every block
    (4 * GiB - 2 * MiB, 4 * MiB),        # straddles a block's start
    (0, 512 * MiB + 4096),               # runs past mem0's end into the hole
    (512 * MiB, 4096),                   # in the hole
    (4 * GiB, 0),                        # empty
], ids=str)
def test_load_outside_the_map_is_format_error(load: tuple[int, int]) -> None:
    with pytest.raises(FormatError, match="outside the memory map"):
        dumped_blocks(MAP, [load])


@st.composite
def plugged_runs(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Disjoint runs of 2 MiB virtio-mem blocks, as QEMU's RAM discard manager replays them."""
    bits = draw(st.lists(st.booleans(), min_size=1024, max_size=1024))
    runs: list[tuple[int, int]] = []
    for i, plugged in enumerate(bits):
        if not plugged:
            continue
        gpa = VMEM.gpa + i * 2 * MiB
        if runs and runs[-1][0] + runs[-1][1] == gpa:
            runs[-1] = (runs[-1][0], runs[-1][1] + 2 * MiB)
        else:
            runs.append((gpa, 2 * MiB))
    return runs


@settings(max_examples=100, deadline=None)
@given(runs=plugged_runs(), order=st.randoms())
def test_dumped_blocks_keep_each_run_with_its_host_address(runs: list[tuple[int, int]],
                                                          order: random.Random) -> None:
    loads = [(0, 512 * MiB), *runs]
    order.shuffle(loads)
    out = dumped_blocks(MAP, loads)
    assert [(b.gpa, b.size) for b in out] == sorted(loads)
    for b in out:
        home = next(m for m in MAP if m.gpa <= b.gpa < m.end)
        assert b.hva - home.hva == b.gpa - home.gpa and (b.name, b.kind) == (home.name, home.kind)
        assert b.end <= home.end


# --- query-memory-devices: the fallback without a dump -----------------------------


def test_parse_virtio_mem_of_real_answer() -> None:
    dimm = {"type": "dimm", "data": {"addr": 5 * GiB, "size": GiB, "id": "d0"}}
    assert parse_virtio_mem([dimm, *ANSWER]) == [VirtioMem("vm0", 4 * GiB, 0, 2 * GiB, 2 * MiB)]
    assert parse_virtio_mem([]) == []


@pytest.mark.parametrize("bad", [
    {"no": "list"},
    [{"type": "virtio-mem"}],
    [{"type": "virtio-mem", "data": {**ANSWER[0]["data"], "size": "0"}}],  # type: ignore[dict-item]
    [{"type": "virtio-mem", "data": {**ANSWER[0]["data"], "max-size": -1}}],  # type: ignore[dict-item]
    [{"type": "virtio-mem", "data": {**ANSWER[0]["data"], "memaddr": True}}],  # type: ignore[dict-item]
], ids=["not-a-list", "no-data", "size-text", "negative", "bool"])
def test_parse_virtio_mem_malformed(bad: object) -> None:
    with pytest.raises(FormatError):
        parse_virtio_mem(bad)


@pytest.mark.parametrize("plugged, kept, partial", [
    (0, [MEM0, BIOS], False),            # nothing plugged: left out (exact)
    (2 * GiB, MAP, False),               # all plugged: whole (exact)
    (256 * MiB, MAP, True),              # partly: whole, flagged
])
def test_clip_virtio_mem(plugged: int, kept: list[GuestPhysBlock], partial: bool) -> None:
    dev = VirtioMem("vm0", 4 * GiB, plugged, 2 * GiB, 2 * MiB)
    assert clip_virtio_mem(MAP, [dev]) == (kept, [dev] if partial else [])
    assert clip_virtio_mem(MAP, []) == (MAP, [])
