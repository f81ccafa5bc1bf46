"""Guest-physical memory map (memmap.py) against real QEMU 7.2 output.

The samples in data/ were captured by data/capture_qemu_samples.py from
qemu-system-x86_64 7.2: ``info mtree -f``, the ``gpa2hva`` answer for every
range, and the (p_paddr, p_memsz) of every PT_LOAD that QEMU's own
``dump-guest-memory paging=false`` wrote.  vmcorefs must find the same blocks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unit_support import DATA

from vmcorefs.core.memmap import (
    MAX_MTREE_CHARS,
    MAX_RANGES,
    FlatRange,
    GuestPhysBlock,
    guest_phys_blocks,
    parse_gpa2hva,
    parse_mtree_flat,
)
from vmcorefs.errors import FormatError

MACHINES = ["pc-memfd", "pc-5g", "q35-numa", "pc-dimm", "pc-seabios"]
GiB = 1 << 30


def load_sample(name: str) -> tuple[str, dict[str, Any]]:
    # newline="" keeps QEMU's CRLF line ends: the parser must cope with them.
    with open(DATA / f"mtree-{name}.txt", encoding="ascii", newline="") as f:
        text = f.read()
    return text, json.loads((DATA / f"mtree-{name}.json").read_text())


def blocks_as_vmcorefs_finds_them(text: str, answers: dict[str, str]) -> list[GuestPhysBlock]:
    """What Guest.ram_blocks does, with the recorded monitor answers."""
    pairs = []
    for fr in parse_mtree_flat(text):
        if not fr.dumped:
            continue
        try:
            hva = parse_gpa2hva(answers[f"{fr.start:#x}"])
        except FormatError:
            continue
        pairs.append((fr, hva))
    return guest_phys_blocks(pairs)


@pytest.mark.parametrize("name", MACHINES)
def test_blocks_equal_qemu_dump_pt_loads(name: str) -> None:
    text, rec = load_sample(name)
    assert rec["qemu_version"].startswith("7.2")
    assert "\r\n" in text
    blocks = blocks_as_vmcorefs_finds_them(text, rec["gpa2hva"])
    assert [[b.gpa, b.size] for b in blocks] == rec["dump_loads"]


@pytest.mark.parametrize("name", MACHINES)
def test_gpa2hva_answers(name: str) -> None:
    text, rec = load_sample(name)
    ranges = {f"{fr.start:#x}": fr for fr in parse_mtree_flat(text)}
    for gpa, answer in rec["gpa2hva"].items():
        fr = ranges.get(gpa)
        if fr is not None and fr.type in ("ram", "rom"):
            assert parse_gpa2hva(answer) > 0
            assert f"({fr.name})" in answer
        else:
            # i/o ranges ("is not RAM") and the unmapped probe ("No memory is mapped").
            with pytest.raises(FormatError) as err:
                parse_gpa2hva(answer)
            assert str(err.value) == answer.strip()


def test_pc_5g_split_around_the_hole() -> None:
    text, rec = load_sample("pc-5g")
    ranges = parse_mtree_flat(text)
    ram = [fr for fr in ranges if fr.name == "pc.ram"]
    assert [(fr.start, fr.end, fr.offset_in_region) for fr in ram] == [
        (0, 0xC0000, 0), (0x100000, 0xC0000000, 0x100000), (0x100000000, 0x180000000, 0xC0000000)]
    blocks = blocks_as_vmcorefs_finds_them(text, rec["gpa2hva"])
    high = blocks[-1]
    assert (high.gpa, high.size, high.name, high.kind) == (4 * GiB, 2 * GiB, "pc.ram", "ram")
    # Host addresses follow offset_in_region within pc.ram.
    low = blocks[0]
    assert high.hva - low.hva == 0xC0000000


def test_pc_seabios_pam_ranges_are_joined() -> None:
    """After SeaBIOS, 0xc0000-0xfffff are pc.ram pieces, some read-only ("rom"):
    QEMU's dump joins them with the RAM around into one block."""
    text, rec = load_sample("pc-seabios")
    ranges = [fr for fr in parse_mtree_flat(text) if fr.dumped]
    assert [fr.type for fr in ranges] == ["ram", "rom", "ram", "rom", "ram", "rom"]
    blocks = blocks_as_vmcorefs_finds_them(text, rec["gpa2hva"])
    assert [(b.gpa, b.size, b.name, b.kind) for b in blocks] == [
        (0, 256 << 20, "pc.ram", "ram"), (0xFFFC0000, 0x40000, "pc.bios", "rom")]


def test_memory_view_is_found_wherever_it_is() -> None:
    # "memory" is FlatView #0 in pc-memfd but #1, #2, #3 in the others.
    for name in MACHINES:
        text, _ = load_sample(name)
        ranges = parse_mtree_flat(text)
        assert ranges[0].start == 0 and ranges[-1].end > 0xFFFFFFFF
        assert any(fr.name == "ioapic" and fr.type == "i/o" for fr in ranges)


def test_other_address_spaces() -> None:
    text, _ = load_sample("q35-numa")
    io = parse_mtree_flat(text, "I/O")
    assert io[0] == FlatRange(0, 8, "i/o", "dma-chan", 0)
    assert io[-1].end == 0x10000
    assert parse_mtree_flat(text, "cpu-smm-1") == parse_mtree_flat(text, "memory")
    assert parse_mtree_flat(text, "mch") == []  # "No rendered FlatView"
    with pytest.raises(FormatError):
        parse_mtree_flat(text, "no-such-as")


def test_flat_ranges_of_pc_memfd() -> None:
    text, _ = load_sample("pc-memfd")
    assert parse_mtree_flat(text) == [
        FlatRange(0, 0xC0000, "ram", "mem0", 0),
        FlatRange(0xC0000, 0xE0000, "rom", "pc.rom", 0),
        FlatRange(0xE0000, 0x100000, "rom", "pc.bios", 0x20000),
        FlatRange(0x100000, 0x10000000, "ram", "mem0", 0x100000),
        FlatRange(0xFEC00000, 0xFEC01000, "i/o", "ioapic", 0),
        FlatRange(0xFED00000, 0xFED00400, "i/o", "hpet", 0),
        FlatRange(0xFEE00000, 0xFEF00000, "i/o", "apic-msi", 0),
        FlatRange(0xFFFC0000, 0x100000000, "rom", "pc.bios", 0),
    ]


# --- single lines ----------------------------------------------------------------


def one_line_view(line: str) -> str:
    return f'FlatView #0\n AS "memory", root: system\n Root memory region: system\n{line}\n'


@pytest.mark.parametrize(
    "line, expected",
    [
        ("  0000000000000000-000000000009ffff (prio 0, ram): pc.ram KVM",
         FlatRange(0, 0xA0000, "ram", "pc.ram", 0)),
        ("  00000000000c0000-00000000000c3fff (prio 0, rom): pc.ram @00000000000c0000 KVM",
         FlatRange(0xC0000, 0xC4000, "rom", "pc.ram", 0xC0000)),
        ("  0000000000100000-000000000fffffff (prio 0, ram): mem0 @0000000000100000 KVM",
         FlatRange(0x100000, 0x10000000, "ram", "mem0", 0x100000)),
        ("  00000000fd000000-00000000fdffffff (prio 1, ramd): 0000:00:02.0 BAR 0 mmaps[0] KVM",
         FlatRange(0xFD000000, 0xFE000000, "ramd", "0000:00:02.0 BAR 0 mmaps[0]", 0)),
        ("  0000000140000000-000000014fffffff (prio 0, nv-ram): nvdimm0mem",
         FlatRange(0x140000000, 0x150000000, "nv-ram", "nvdimm0mem", 0)),
        ("  00000000ffc00000-00000000ffffffff (prio 0, romd): system.flash0 KVM",
         FlatRange(0xFFC00000, 0x100000000, "romd", "system.flash0", 0)),
        ("  00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi",
         FlatRange(0xFEE00000, 0xFEF00000, "i/o", "apic-msi", 0)),
        ("  0000000000000000-ffffffffffffffff (prio -1000, i/o): unassigned",
         FlatRange(0, 1 << 64, "i/o", "unassigned", 0)),
        ("  0000000000001000-0000000000001000 (prio 0, ram): one-byte",
         FlatRange(0x1000, 0x1001, "ram", "one-byte", 0)),
    ],
)
def test_range_lines(line: str, expected: FlatRange) -> None:
    assert parse_mtree_flat(one_line_view(line)) == [expected]


@pytest.mark.parametrize(
    "type_, dumped",
    [("ram", True), ("rom", True), ("ramd", False), ("romd", False), ("i/o", False),
     ("nv-ram", False), ("nv-rom", False)],
)
def test_dumped_types(type_: str, dumped: bool) -> None:
    assert FlatRange(0, 1, type_, "x", 0).dumped is dumped


RANGE = "  0000000000000000-0000000000000fff (prio 0, ram): a"
MALFORMED = {
    "empty": "",
    "no-memory-flatview": 'FlatView #0\n AS "I/O", root: io\n Root memory region: io\n' + RANGE + "\n",
    "garbage-line": one_line_view(RANGE + "\n  this is not a range"),
    "truncated-line": one_line_view("  0000000000000000-0000000000000fff (prio 0, ram"),
    "hex-too-long": one_line_view("  00000000000000000-0000000000000fff (prio 0, ram): a"),
    "last-before-start": one_line_view("  0000000000002000-0000000000000fff (prio 0, ram): a"),
    "overlapping": one_line_view(RANGE + "\n  0000000000000800-0000000000001fff (prio 0, ram): b"),
    "unsorted": one_line_view("  0000000000002000-0000000000002fff (prio 0, ram): b\n" + RANGE),
    "duplicate": one_line_view(RANGE + "\n" + RANGE),
    "huge-text": one_line_view(RANGE) + " " * MAX_MTREE_CHARS,
    "as-without-root-line": 'FlatView #0\n AS "memory", root: system\n' + RANGE + "\n",
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_mtree(name: str) -> None:
    with pytest.raises(FormatError):
        parse_mtree_flat(MALFORMED[name])


def test_too_many_ranges() -> None:
    lines = "\n".join(f"  {i * 16:016x}-{i * 16 + 15:016x} (prio 0, i/o): r" for i in range(MAX_RANGES + 1))
    with pytest.raises(FormatError):
        parse_mtree_flat(one_line_view(lines))


def test_garbage_in_other_views_is_ignored() -> None:
    text = ('FlatView #0\n AS "I/O", root: io\n Root memory region: io\n  ??? garbage ???\n\n'
            + one_line_view(RANGE).replace("#0", "#1")
            + 'FlatView #2\n AS "x", root: x\n Root memory region: x\n  more garbage\n')
    assert parse_mtree_flat(text) == [FlatRange(0, 0x1000, "ram", "a", 0)]


# --- properties ------------------------------------------------------------------


def render(ranges: list[FlatRange], kvm: bool) -> str:
    """Format ranges as QEMU's mtree_print_flatview does."""
    lines = []
    for fr in ranges:
        line = f"  {fr.start:016x}-{fr.end - 1:016x} (prio 0, {fr.type}): {fr.name}"
        if fr.offset_in_region:
            line += f" @{fr.offset_in_region:016x}"
        lines.append(line + (" KVM" if kvm else ""))
    return ('FlatView #0\r\n AS "I/O", root: io\r\n Root memory region: io\r\n'
            '  0000000000000000-000000000000ffff (prio 0, i/o): io\r\n\r\n'
            'FlatView #1\r\n AS "memory", root: system\r\n AS "cpu-memory-0", root: system\r\n'
            ' Root memory region: system\r\n' + "\r\n".join(lines) + "\r\n\r\n")


region_names = st.text(st.sampled_from("abcxyz.-_0123456789:[] "), min_size=1, max_size=20).filter(
    lambda s: s == s.strip() and not s.endswith(" KVM"))


@st.composite
def flat_views(draw: st.DrawFn) -> list[FlatRange]:
    pos = draw(st.integers(0, 1 << 40))
    out = []
    for _ in range(draw(st.integers(0, 30))):
        pos += draw(st.integers(0, 1 << 32))
        size = draw(st.integers(1, 1 << 34))
        if pos + size > 1 << 64:
            break
        out.append(FlatRange(pos, pos + size, draw(st.sampled_from(["ram", "rom", "i/o", "romd", "ramd", "nv-ram"])),
                             draw(region_names), draw(st.integers(0, (1 << 64) - 1))))
        pos += size
    return out


@settings(max_examples=120, deadline=None)
@given(flat_views(), st.booleans())
def test_mtree_round_trip(ranges: list[FlatRange], kvm: bool) -> None:
    assert parse_mtree_flat(render(ranges, kvm)) == ranges


REAL_TEXTS = [load_sample(n)[0] for n in MACHINES]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(REAL_TEXTS), st.data())
def test_mutated_mtree_only_format_error(text: str, data: st.DataObject) -> None:
    lines = text.splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["delete", "garbage", "swap", "char"]))
        if op == "delete":
            del lines[i]
        elif op == "garbage":
            lines[i] = data.draw(st.text(max_size=80))
        elif op == "swap":
            j = data.draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif lines[i]:
            k = data.draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:k] + data.draw(st.characters()) + lines[i][k + 1:]
        if not lines:
            break
    try:
        ranges = parse_mtree_flat("\n".join(lines))
    except FormatError:
        return
    for a, b in zip(ranges, ranges[1:]):
        assert a.start < a.end <= b.start


# --- guest_phys_blocks ---------------------------------------------------------


def fr(start: int, size: int, name: str = "pc.ram", type_: str = "ram") -> FlatRange:
    return FlatRange(start, start + size, type_, name, 0)


H = 0x7F0000000000


@pytest.mark.parametrize(
    "pairs, expected",
    [
        pytest.param([], [], id="empty"),
        pytest.param([(fr(0, 0x1000), H)], [GuestPhysBlock(0, 0x1000, H, "pc.ram", "ram")], id="one"),
        pytest.param([(fr(0, 0x1000), H), (fr(0x1000, 0x1000, type_="rom"), H + 0x1000)],
                     [GuestPhysBlock(0, 0x2000, H, "pc.ram", "ram")], id="joined-keeps-first-kind"),
        pytest.param([(fr(0, 0x1000), H), (fr(0x1000, 0x1000), H + 0x2000)],
                     [GuestPhysBlock(0, 0x1000, H, "pc.ram", "ram"), GuestPhysBlock(0x1000, 0x1000, H + 0x2000, "pc.ram", "ram")],
                     id="host-gap"),
        pytest.param([(fr(0, 0x1000), H), (fr(0x1000, 0x1000, "other"), H + 0x1000)],
                     [GuestPhysBlock(0, 0x1000, H, "pc.ram", "ram"), GuestPhysBlock(0x1000, 0x1000, H + 0x1000, "other", "ram")],
                     id="other-region"),
        pytest.param([(fr(0, 0x1000), H), (fr(0x2000, 0x1000), H + 0x1000)],
                     [GuestPhysBlock(0, 0x1000, H, "pc.ram", "ram"), GuestPhysBlock(0x2000, 0x1000, H + 0x1000, "pc.ram", "ram")],
                     id="guest-gap"),
        pytest.param([(fr(0, 0x1000), H), (fr(0x1000, 0x1000), H + 0x1000), (fr(0x2000, 0x1000), H + 0x2000)],
                     [GuestPhysBlock(0, 0x3000, H, "pc.ram", "ram")], id="three-joined"),
    ],
)
def test_guest_phys_blocks_table(pairs: list[tuple[FlatRange, int]], expected: list[GuestPhysBlock]) -> None:
    assert guest_phys_blocks(pairs) == expected


@st.composite
def dumped_pairs(draw: st.DrawFn) -> list[tuple[FlatRange, int]]:
    pos, hva = 0, H
    out = []
    for _ in range(draw(st.integers(0, 20))):
        pos += draw(st.sampled_from([0, 0, 0x1000]))
        hva += draw(st.sampled_from([0, 0, 0x1000, -0x100000]))
        size = draw(st.integers(1, 0x10000))
        out.append((fr(pos, size, draw(st.sampled_from(["a", "b"])), draw(st.sampled_from(["ram", "rom"]))), hva))
        pos += size
        hva += size
    return out


@settings(max_examples=150, deadline=None)
@given(dumped_pairs())
def test_guest_phys_blocks_properties(pairs: list[tuple[FlatRange, int]]) -> None:
    blocks = guest_phys_blocks(pairs)
    assert sum(b.size for b in blocks) == sum(f.size for f, _ in pairs)
    # Each range lands in exactly one block, at the right host address.
    for f, hva in pairs:
        (b,) = [b for b in blocks if b.gpa <= f.start < b.end]
        assert f.end <= b.end and b.name == f.name
        assert b.hva + (f.start - b.gpa) == hva
    # Neighbouring blocks could not have been joined.
    for a, b in zip(blocks, blocks[1:]):
        assert a.end <= b.gpa
        assert a.end != b.gpa or a.hva + a.size != b.hva or a.name != b.name


# --- gpa2hva -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Host virtual address for 0x0 (mem0) is 0x7fd3a3fff000\r\n", 0x7FD3A3FFF000),
        ("Host virtual address for 0x100000000 (pc.ram) is 0x7f7a53e00000", 0x7F7A53E00000),
        ("  Host virtual address for 0xc0000 (pc.rom) is 0x7FD3F9C00000  \n", 0x7FD3F9C00000),
        ("Host virtual address for 0x0 (0000:00:02.0 BAR 0 (x)) is 0x1000", 0x1000),
    ],
)
def test_parse_gpa2hva(text: str, expected: int) -> None:
    assert parse_gpa2hva(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Memory at address 0xfec00000 is not RAM\r\n",
        "Memory at address 0xfec00000is not RAM\r\n",  # upstream 7.2 lacks the space
        "No memory is mapped at address 0x10000000\r\n",
        "",
        "\r\n",
        "Host virtual address for 0x0 (mem0) is 0x\r\n",
        "Host virtual address for 0x0 (mem0) is 0x7f00 and more",
        "Host virtual address for 0x0 (mem0) is 0x7f00\nHost virtual address for 0x1 (mem0) is 0x7f01",
        "unknown command: 'gpa2hva'",
    ],
)
def test_parse_gpa2hva_errors(text: str) -> None:
    with pytest.raises(FormatError) as err:
        parse_gpa2hva(text)
    assert str(err.value) == (text.strip()[:200] or "empty gpa2hva answer")
