"""/proc/PID/maps parsing (qemu.memory.parse_maps), on real QEMU lines."""

from __future__ import annotations

import json

import pytest
from unit_support import DATA

from vmcorefs.qemu.memory import Mapping, parse_maps

MEMFD = ("7fd3a3fff000-7fd3b3fff000 rw-s 00000000 00:01 38                         "
         "/memfd:memory-backend-memfd (deleted)")


@pytest.mark.parametrize(
    "line, expected, shared",
    [
        pytest.param(MEMFD, Mapping(0x7FD3A3FFF000, 0x7FD3B3FFF000, "rw-s", 0, (0, 1), 38,
                                    "/memfd:memory-backend-memfd (deleted)"), True, id="memfd-shared"),
        pytest.param("7f7993e00000-7f7ad3e00000 rw-p 00000000 00:00 0 ",
                     Mapping(0x7F7993E00000, 0x7F7AD3E00000, "rw-p", 0, (0, 0), 0, ""), False,
                     id="anonymous-private-ram"),
        pytest.param("55f2cc810000-55f2ccda7000 r-xp 00407000 fe:00 2170918                    "
                     "/usr/bin/qemu-system-x86_64",
                     Mapping(0x55F2CC810000, 0x55F2CCDA7000, "r-xp", 0x407000, (0xFE, 0), 2170918,
                             "/usr/bin/qemu-system-x86_64"), False, id="private-file"),
        pytest.param("55f2fd59d000-55f2fe49b000 rw-p 00000000 00:00 0                          [heap]",
                     Mapping(0x55F2FD59D000, 0x55F2FE49B000, "rw-p", 0, (0, 0), 0, "[heap]"), False,
                     id="heap"),
        pytest.param("7f0000000000-7f0040000000 rw-s 40000000 00:2e 123456                     "
                     "/dev/hugepages/qemu_back_mem.pc.ram.AbCdEf (deleted)",
                     Mapping(0x7F0000000000, 0x7F0040000000, "rw-s", 0x40000000, (0, 0x2E), 123456,
                             "/dev/hugepages/qemu_back_mem.pc.ram.AbCdEf (deleted)"), True,
                     id="hugetlbfs-shared-offset"),
        pytest.param("7f0000000000-7f0000100000 rw-s 00000000 103:02 77 /var/lib/vm/guest ram.img",
                     Mapping(0x7F0000000000, 0x7F0000100000, "rw-s", 0, (0x103, 2), 77,
                             "/var/lib/vm/guest ram.img"), True, id="file-with-space-and-3-digit-major"),
        pytest.param("7f0000000000-7f0000100000 rw-s 00000000 00:00 0 ",
                     Mapping(0x7F0000000000, 0x7F0000100000, "rw-s", 0, (0, 0), 0, ""), False,
                     id="shared-without-inode"),
        pytest.param("ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
                     Mapping(0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, "--xp", 0, (0, 0), 0, "[vsyscall]"),
                     False, id="vsyscall"),
    ],
)
def test_parse_maps_lines(line: str, expected: Mapping, shared: bool) -> None:
    (m,) = parse_maps(line)
    assert m == expected
    assert m.shared_file is shared


def test_parse_maps_skips_junk() -> None:
    text = "\n".join(["", "garbage", "7f00-7f01 rw-p", MEMFD, "zzzz-7f01 rw-p 0 00:00 0"])
    assert [m.path for m in parse_maps(text)] == ["/memfd:memory-backend-memfd (deleted)"]
    assert parse_maps("") == []


@pytest.mark.parametrize("name, shared_ram", [("pc-memfd", True), ("pc-5g", False), ("q35-numa", False),
                                               ("pc-dimm", False), ("pc-seabios", False)])
def test_real_maps_hold_guest_ram(name: str, shared_ram: bool) -> None:
    """The captured maps lines contain every host address gpa2hva gave for RAM."""
    rec = json.loads((DATA / f"mtree-{name}.json").read_text())
    maps = parse_maps("\n".join(rec["maps"]))
    assert len(maps) == len(rec["maps"])
    ram = [a for a in rec["gpa2hva"].values() if "(mem0)" in a or "(pc.ram)" in a or "(m0)" in a]
    assert ram
    for answer in ram:
        hva = int(answer.split(" is ")[1], 16)
        (m,) = [m for m in maps if m.start <= hva < m.end]
        assert m.shared_file is shared_ram
        if shared_ram:
            assert m.path == "/memfd:memory-backend-memfd (deleted)" and m.perms == "rw-s"
        else:
            assert m.path == "" and m.perms == "rw-p"
