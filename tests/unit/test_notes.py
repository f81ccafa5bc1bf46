"""ELF notes and VMCOREINFO (notes.py), including hostile guest-sized input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unit_support import DATA, NHDR, encode_note

from vmcorefs.core.elf import parse_qemu_dump
from vmcorefs.core.notes import (
    MAX_VMCOREINFO,
    MAX_VMCOREINFO_KEYS,
    NT_PRSTATUS,
    Note,
    count_cpus,
    parse_notes,
    parse_vmcoreinfo,
    vmcoreinfo_text,
)
from vmcorefs.errors import FormatError

CORE = encode_note(b"CORE", NT_PRSTATUS, b"\x11" * 336)
QEMU = encode_note(b"QEMU", 0, b"\x22" * 440)
VMCI = encode_note(b"VMCOREINFO", 0, b"OSRELEASE=6.1.0\nPAGESIZE=4096\n\0")


@pytest.mark.parametrize(
    "data, expected",
    [
        pytest.param(b"", [], id="empty"),
        pytest.param(CORE, [Note("CORE", 1, b"\x11" * 336)], id="one-core"),
        pytest.param(CORE + CORE + QEMU + QEMU + VMCI,
                     [Note("CORE", 1, b"\x11" * 336)] * 2 + [Note("QEMU", 0, b"\x22" * 440)] * 2
                     + [Note("VMCOREINFO", 0, b"OSRELEASE=6.1.0\nPAGESIZE=4096\n\0")],
                     id="qemu-x86-layout"),
        pytest.param(NHDR.pack(0, 0, 7), [Note("", 7, b"")], id="empty-name-and-desc"),
        pytest.param(NHDR.pack(4, 2, 1) + b"CORE" + b"hi\0\0", [Note("CORE", 1, b"hi")],
                     id="unterminated-name"),
        pytest.param(NHDR.pack(6, 0, 1) + b"AB\0CD\0\0\0", [Note("AB", 1, b"")], id="nul-inside-name"),
        pytest.param(NHDR.pack(3, 0, 1) + b"\xff\xfeA\0", [Note("\ufffd\ufffdA", 1, b"")],
                     id="non-ascii-name"),
        pytest.param(NHDR.pack(5, 3, 1) + b"CORE\0\0\0\0" + b"abc", [Note("CORE", 1, b"abc")],
                     id="last-desc-unpadded"),
        pytest.param(CORE + b"\0" * 11, [Note("CORE", 1, b"\x11" * 336)],
                     id="trailing-garbage-shorter-than-header"),
        pytest.param(CORE + b"\0" * 12, [Note("CORE", 1, b"\x11" * 336), Note("", 0, b"")],
                     id="trailing-zero-header"),
        pytest.param(NHDR.pack(5, 0, 0xFFFFFFFF) + b"CORE\0\0\0\0", [Note("CORE", 0xFFFFFFFF, b"")],
                     id="max-type"),
    ],
)
def test_parse_notes_table(data: bytes, expected: list[Note]) -> None:
    assert parse_notes(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(NHDR.pack(5, 336, 1) + b"CORE\0\0\0\0" + b"x" * 335, id="desc-one-short"),
        pytest.param(NHDR.pack(100, 0, 1) + b"CORE\0", id="namesz-past-end"),
        pytest.param(NHDR.pack(0xFFFFFFFF, 0, 1) + b"x" * 64, id="namesz-huge"),
        pytest.param(NHDR.pack(5, 0xFFFFFFFF, 1) + b"CORE\0\0\0\0" + b"x" * 64, id="descsz-huge"),
        pytest.param(NHDR.pack(0xFFFFFFFF, 0xFFFFFFFF, 1), id="both-huge"),
        pytest.param(CORE + NHDR.pack(5, 1 << 20, 1) + b"CORE\0\0\0\0", id="second-note-lies"),
    ],
)
def test_parse_notes_lying_sizes(data: bytes) -> None:
    with pytest.raises(FormatError):
        parse_notes(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_parse_notes_random_bytes_bounded(data: bytes) -> None:
    try:
        notes = parse_notes(data)
    except FormatError:
        return
    assert len(notes) <= len(data) // NHDR.size
    assert sum(len(n.desc) for n in notes) <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=4), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
                          st.binary(max_size=40)), max_size=5))
def test_parse_notes_random_headers(parts: list[tuple[bytes, int, int, bytes]]) -> None:
    """Arbitrary n_namesz/n_descsz words followed by arbitrary bytes."""
    data = b"".join(NHDR.pack(n, d, 1) + pre + body for pre, n, d, body in parts)
    try:
        notes = parse_notes(data)
    except FormatError:
        return
    assert len(notes) <= len(data) // NHDR.size


note_names = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(note_names, st.integers(0, 0xFFFFFFFF), st.binary(max_size=100)), max_size=10))
def test_notes_round_trip(notes: list[tuple[str, int, bytes]]) -> None:
    data = b"".join(encode_note(name.encode(), ntype, desc) for name, ntype, desc in notes)
    assert len(data) % 4 == 0
    assert parse_notes(data) == [Note(name, ntype, desc) for name, ntype, desc in notes]


# --- VMCOREINFO ----------------------------------------------------------------


@pytest.mark.parametrize(
    "notes, expected",
    [
        pytest.param([], None, id="no-notes"),
        pytest.param([Note("CORE", 1, b"x")], None, id="no-vmcoreinfo"),
        pytest.param([Note("VMCOREINFO", 0, b"OSRELEASE=6.1\n")], "OSRELEASE=6.1\n", id="plain"),
        pytest.param([Note("VMCOREINFO", 0, b"OSRELEASE=6.1\n\0\0garbage")], "OSRELEASE=6.1\n",
                     id="nul-terminated"),
        pytest.param([Note("VMCOREINFO", 0, b"A=1"), Note("VMCOREINFO", 0, b"B=2")], "A=1",
                     id="first-wins"),
        pytest.param([Note("VMCOREINFO", 0, b"")], "", id="empty"),
        pytest.param([Note("VMCOREINFO", 0, b"K=\xff")], "K=\ufffd", id="non-ascii-replaced"),
        pytest.param([Note("vmcoreinfo", 0, b"A=1")], None, id="name-is-case-sensitive"),
    ],
)
def test_vmcoreinfo_text_table(notes: list[Note], expected: str | None) -> None:
    assert vmcoreinfo_text(notes) == expected


def test_vmcoreinfo_text_bounded() -> None:
    text = vmcoreinfo_text([Note("VMCOREINFO", 0, b"A" * (MAX_VMCOREINFO + 4096))])
    assert text is not None and len(text) == MAX_VMCOREINFO


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("", {}, id="empty"),
        pytest.param("OSRELEASE=6.1.0\nPAGESIZE=4096\n", {"OSRELEASE": "6.1.0", "PAGESIZE": "4096"},
                     id="basic"),
        pytest.param("A=1\nA=2\n", {"A": "1"}, id="first-wins"),
        pytest.param("SYMBOL(x)=a=b\n", {"SYMBOL(x)": "a=b"}, id="value-with-equals"),
        pytest.param("no equals here\n\n=orphan\nB=\n", {"B": ""}, id="skips-junk"),
        pytest.param("  KEY  =  v  \r\nK2=v2\r\n", {"KEY": "v", "K2": "v2"}, id="whitespace-crlf"),
        pytest.param("   =x\nC=3\n", {"C": "3"}, id="whitespace-only-key-skipped"),
        pytest.param("NUMBER(phys_base)=-123731968", {"NUMBER(phys_base)": "-123731968"},
                     id="no-final-newline"),
    ],
)
def test_parse_vmcoreinfo_table(text: str, expected: dict[str, str]) -> None:
    assert parse_vmcoreinfo(text) == expected


def test_parse_vmcoreinfo_key_count_bounded() -> None:
    text = "".join(f"K{i}={i}\n" for i in range(MAX_VMCOREINFO_KEYS * 2))
    out = parse_vmcoreinfo(text)
    assert len(out) == MAX_VMCOREINFO_KEYS
    assert out["K0"] == "0" and f"K{MAX_VMCOREINFO_KEYS}" not in out


@settings(max_examples=150, deadline=None)
@given(st.text(st.sampled_from("AB =\n\r\t\x0b\u2028\u00a0x"), max_size=120) | st.text(max_size=120))
def test_parse_vmcoreinfo_any_text(text: str) -> None:
    out = parse_vmcoreinfo(text)
    assert len(out) <= MAX_VMCOREINFO_KEYS
    assert all(key and key == key.strip() for key in out)


def test_real_vmcoreinfo() -> None:
    info = parse_qemu_dump((DATA / "qemu72-onebyte-dump.elf").read_bytes())
    text = vmcoreinfo_text(parse_notes(info.notes))
    assert text is not None
    vci = parse_vmcoreinfo(text)
    assert vci["OSRELEASE"] == "6.1.0-56-cloud-amd64"
    assert vci["PAGESIZE"] == "4096"
    assert vci["KERNELOFFSET"] == "10800000"
    assert vci["NUMBER(phys_base)"] == "-123731968"
    assert "SYMBOL(init_uts_ns)" in vci


# --- count_cpus ----------------------------------------------------------------


@pytest.mark.parametrize(
    "notes, expected",
    [
        pytest.param([], 0, id="none"),
        pytest.param([Note("CORE", 1, b"")] * 4, 4, id="four"),
        pytest.param([Note("CORE", 1, b""), Note("CORE", 2, b""), Note("QEMU", 1, b""),
                      Note("LINUX", 1, b""), Note("VMCOREINFO", 0, b"")], 1, id="only-core-prstatus"),
    ],
)
def test_count_cpus(notes: list[Note], expected: int) -> None:
    assert count_cpus(notes) == expected


def test_qemu_x86_cpu_states_from_real_dump() -> None:
    from vmcorefs.core.notes import qemu_x86_cpu_states

    info = parse_qemu_dump((DATA / "qemu72-onebyte-dump.elf").read_bytes())
    cpus = qemu_x86_cpu_states(parse_notes(info.notes))
    assert len(cpus) == 2
    for cpu in cpus:
        assert cpu.in_kernel and cpu.cs_selector == 0x10  # __KERNEL_CS
        assert cpu.cr3 and cpu.cr3 < 1 << 32 and cpu.cr3 & 0xFFF == 0
        assert not cpu.cr4 & (1 << 12)  # 4-level paging


@pytest.mark.parametrize("desc", [b"", b"\0" * 100, b"\0" * 431])
def test_qemu_x86_cpu_states_short_notes_are_skipped(desc: bytes) -> None:
    from vmcorefs.core.notes import Note, qemu_x86_cpu_states

    assert qemu_x86_cpu_states([Note("QEMU", 0, desc), Note("CORE", 1, b"\0" * 500)]) == []
