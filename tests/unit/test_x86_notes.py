"""x86 notes from ``info registers -a`` (core/x86_notes.py) against QEMU's own.

The samples in data/ are real: ``qemuVV-x86-SCENE.registers.txt`` is QEMU's
``info registers -a`` of a paused guest and ``qemuVV-x86-SCENE-onebyte-dump.elf``
QEMU's 1-byte ``dump-guest-memory`` of the same paused instant
(data/capture_x86_registers.py).  ``busy``: the 6.1 test guest with one vCPU
caught in user mode; ``reset``: two vCPUs at reset (real mode, EM_386 notes).
"""

from __future__ import annotations

import json
import re

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st
from unit_support import DATA

from vmcorefs.core.notes import Note, parse_notes
from vmcorefs.core.x86_notes import (
    MAX_TEXT,
    QEMUCPUState,
    X86VCPU,
    build_x86_notes,
    parse_info_registers,
    prstatus_desc,
    qemu_cpu_state,
    vmcoreinfo_note,
)
from vmcorefs.errors import FormatError

SAMPLES = ["qemu72-x86-busy", "qemu72-x86-reset", "qemu100-x86-busy", "qemu100-x86-reset"]
KERNEL_SPACE = 0xFFFF800000000000


def sample(name: str) -> tuple[str, bytes, int, dict[str, object]]:
    """(info registers text, QEMU's PT_NOTE bytes, e_machine, capture record)."""
    text = (DATA / f"{name}.registers.txt").read_text()
    with open(DATA / f"{name}-onebyte-dump.elf", "rb") as f:
        elf = ELFFile(f)
        (notes,) = [seg.data() for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE"]
        machine = elf.header["e_machine"]
    record = json.loads((DATA / f"{name}.json").read_text())
    return text, notes, {"EM_X86_64": 62, "EM_386": 3}[machine], record


def vmcoreinfo_of(notes: list[Note]) -> bytes | None:
    found = [n.desc for n in notes if n.name == "VMCOREINFO"]
    return found[0] if found else None


@pytest.mark.parametrize("name", SAMPLES)
def test_notes_equal_qemus_except_kernel_gs_base(name: str) -> None:
    text, qemu_bytes, machine, record = sample(name)
    qemu = parse_notes(qemu_bytes)
    cpus = parse_info_registers(text)
    assert [c.cpu_index for c in cpus] == list(range(len(cpus))) == list(range(2))
    assert [c.cpl for c in cpus] == record["cpl"]
    assert (machine == 62) == cpus[0].lma
    # QEMU's order: every CORE note, then every QEMU note, then the guest's.
    assert [(n.name, n.type) for n in qemu][:4] == [("CORE", 1), ("CORE", 1), ("QEMU", 0), ("QEMU", 0)]
    vmcoreinfo = vmcoreinfo_of(qemu)
    assert (vmcoreinfo is not None) == name.endswith("busy")

    ours = build_x86_notes(cpus, vmcoreinfo)
    assert len(ours) == len(qemu_bytes)
    theirs_kgs = [QEMUCPUState.unpack(n.desc).kernel_gs_base for n in qemu if n.name == "QEMU"]
    # The one field `info registers` does not print, given: byte for byte.
    assert build_x86_notes(cpus, vmcoreinfo, kernel_gs_base=theirs_kgs) == qemu_bytes
    # Without it: a vCPU in the kernel holds the user GS base there (0 for
    # busybox), so its note is exact; one in user mode holds the kernel's
    # per-CPU base, which we cannot know and write as 0.
    for cpu, kgs, mine, theirs in zip(cpus, theirs_kgs, parse_notes(ours)[2:4], qemu[2:4]):
        assert "kernel_gs_base" in cpu.unknown
        if cpu.cpl == 0:
            assert kgs == 0 and mine == theirs
        else:
            assert kgs >= KERNEL_SPACE and mine != theirs
            assert QEMUCPUState.unpack(mine.desc).kernel_gs_base == 0
    assert parse_notes(ours)[:2] == qemu[:2]  # prstatus: exact
    assert parse_notes(ours)[4:] == qemu[4:]


@pytest.mark.parametrize("name", ["qemu72-x86-busy", "qemu100-x86-busy"])
def test_busy_sample_has_a_user_mode_vcpu(name: str) -> None:
    """The samples cover a vCPU in user mode (64-bit busybox shell loop) and
    one in the kernel: selectors, FS base, and prstatus pr_pid / regs."""
    text, qemu_bytes, _, _ = sample(name)
    cpus = parse_info_registers(text)
    user = next(c for c in cpus if c.cpl == 3)
    kernel = next(c for c in cpus if c.cpl == 0)
    assert user.segments["cs"].selector == 0x33 and user.segments["ss"].selector == 0x2B
    assert user.regs["rip"] < KERNEL_SPACE and kernel.regs["rip"] >= KERNEL_SPACE
    assert user.segments["fs"].base != 0 and user.segments["fs"].selector == 0  # TLS through the MSR
    assert user.code64 and user.unknown == ("kernel_gs_base",)
    core = [n for n in parse_notes(qemu_bytes) if n.name == "CORE"]
    for cpu, note in zip(cpus, core):
        assert note.desc == prstatus_desc(cpu, x86_64=True)
        assert int.from_bytes(note.desc[32:36], "little") == cpu.cpu_index + 1  # pr_pid


@pytest.mark.parametrize("name", ["qemu72-x86-busy", "qemu100-x86-busy"])
def test_tcg_descriptor_bits_in_segment_flags(name: str) -> None:
    """TCG keeps the raw descriptor word in flags: the TR of vCPU 1 (TSS in
    the cpu_entry_area, base bits 16-23 non-zero) has them, masked out of the
    printed value; KVM-style flags (tcg=False) keep the printed value."""
    text, qemu_bytes, _, _ = sample(name)
    cpus = parse_info_registers(text)
    qemu = [QEMUCPUState.unpack(n.desc) for n in parse_notes(qemu_bytes) if n.name == "QEMU"]
    tr = cpus[1].segments["tr"]
    assert (tr.base >> 16) & 0xFF != 0
    assert qemu[1].segments["tr"].flags == tr.flags | (tr.base >> 16) & 0xFF != tr.flags
    assert qemu_cpu_state(cpus[1]).segments["tr"] == qemu[1].segments["tr"]
    assert qemu_cpu_state(cpus[1], tcg=False).segments["tr"].flags == tr.flags


def test_reset_sample_is_real_mode_with_unknown_high_halves() -> None:
    cpus = parse_info_registers(sample("qemu72-x86-reset")[0])
    for cpu in cpus:
        assert not cpu.code64 and not cpu.lma
        assert cpu.segments["cs"].selector == 0xF000 and cpu.segments["cs"].base == 0xFFFF0000
        assert cpu.regs["rip"] == 0xFFF0
        assert {"r8", "r15", "rax[63:32]", "kernel_gs_base"} <= set(cpu.unknown)
    assert [c.halted for c in cpus] == [False, True]  # the AP waits for INIT-SIPI


COMPAT = """
CPU#0
EAX=00000001 EBX=00000002 ECX=00000003 EDX=00000004
ESI=00000005 EDI=00000006 EBP=00000007 ESP=ffffd000
EIP=08049000 EFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0
ES =002b 00000000 ffffffff 00cff300 DPL=3 DS   [-WA]
CS =0023 00000000 ffffffff 00cffb00 DPL=3 CS32 [-RA]
SS =002b 00000000 ffffffff 00cff300 DPL=3 DS   [-WA]
DS =002b 00000000 ffffffff 00cff300 DPL=3 DS   [-WA]
FS =0000 00000000 00000000 00000000
GS =0063 f7f8a000 ffffffff 00d0f300 DPL=3 DS   [-WA]
LDT=0000 00000000 00000000 00008200 DPL=0 LDT
TR =0040 00003000 00004087 00008900 DPL=0 TSS64-avl
GDT=     fffffe0000001000 0000007f
IDT=     fffffe0000000000 00000fff
CR0=80050033 CR2=00000000f7f8b000 CR3=0000000002926000 CR4=000006a0
EFER=0000000000000d01
"""


def test_compatibility_mode_vcpu() -> None:
    """A 32-bit process under a 64-bit kernel: QEMU prints 32-bit registers
    and bases but 64-bit tables; the missing bits are named and written 0.
    A TLS GS from the GDT (non-null selector) gets its base bits in flags.
    The text is written by hand in QEMU's format (the test guest has no
    32-bit program to capture), so this checks the parser, not QEMU."""
    (cpu,) = parse_info_registers(COMPAT)
    assert cpu.lma and not cpu.code64 and cpu.cpl == 3
    assert {"r8", "rax[63:32]", "tr.base[63:32]", "kernel_gs_base"} <= set(cpu.unknown)
    assert cpu.regs["rsp"] == 0xFFFFD000 and cpu.regs["r8"] == 0
    state = qemu_cpu_state(cpu)
    assert state.segments["gs"].flags == 0xF7D0F3F8  # base 0xf7f8a000: bits 24-31 f7, 16-23 f8
    assert state.segments["fs"].flags == 0 and state.segments["cs"].flags == 0x00CFFB00
    notes = parse_notes(build_x86_notes([cpu], None))
    assert [len(n.desc) for n in notes] == [336, 440]  # x86-64 prstatus: the first vCPU is in long mode


def test_qemu_cpu_state_round_trip() -> None:
    _, qemu_bytes, _, _ = sample("qemu100-x86-busy")
    for note in parse_notes(qemu_bytes):
        if note.name == "QEMU":
            assert QEMUCPUState.unpack(note.desc).pack() == note.desc
    with pytest.raises(FormatError, match="432 bytes"):
        QEMUCPUState.unpack(b"\0" * 432)
    with pytest.raises(FormatError, match="version 2"):
        QEMUCPUState.unpack(b"\2\0\0\0\xb8\1\0\0" + b"\0" * 432)


def test_vmcoreinfo_note_and_arguments() -> None:
    cpus = parse_info_registers(sample("qemu72-x86-busy")[0])
    assert vmcoreinfo_note(b"OSRELEASE=6.1\n") == (
        b"\x0b\0\0\0\x0e\0\0\0\0\0\0\0VMCOREINFO\0\0OSRELEASE=6.1\n\0\0")
    assert vmcoreinfo_note("OSRELEASE=6.1\n") == vmcoreinfo_note(b"OSRELEASE=6.1\n")
    with pytest.raises(FormatError, match="not ASCII"):
        vmcoreinfo_note("OSRELEASE=6.1\u00e9\n")
    with pytest.raises(FormatError, match="VMCOREINFO of"):
        build_x86_notes(cpus, b"x" * ((1 << 20) + 1))
    with pytest.raises(ValueError, match="one value per vCPU"):
        build_x86_notes(cpus, None, kernel_gs_base=[0])
    with pytest.raises(FormatError, match="no vCPUs"):
        build_x86_notes([], None)
    assert len(build_x86_notes(cpus, None)) == 2 * (356 + 460)


BUSY = sample("qemu72-x86-busy")[0]
RESET = sample("qemu72-x86-reset")[0]


def replace_line(text: str, prefix: str, new: str | None) -> str:
    """``text`` with its first line starting with ``prefix`` replaced (None: dropped)."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    lines[i:i + 1] = [] if new is None else [new]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param("", "no vCPU", id="empty"),
        pytest.param("unknown command: 'info'\n", "expected a CPU#N line.*unknown command", id="hmp-error"),
        pytest.param(BUSY.replace("CPU#1", "CPU#0"), "duplicate", id="duplicate-cpu"),
        pytest.param(replace_line(BUSY, "EFER", None), "CPU#0 lacks EFER", id="no-efer"),
        pytest.param(replace_line(BUSY, "TR ", None), "CPU#0 lacks TR", id="no-tr"),
        pytest.param(replace_line(BUSY, "R12", "R12=0 R13=0 R14=0 R15=0"), "bad hex field '0'", id="short-hex"),
        pytest.param(replace_line(BUSY, "RAX", "RAX=zzzzzzzzzzzzzzzz RBX=0000000000000000 "
                                              "RCX=0000000000000000 RDX=0000000000000000"),
                     "bad hex field 'zzzz", id="not-hex"),
        pytest.param(replace_line(BUSY, "RAX", "RAX=0000000000000000 RCX=0000000000000000"),
                     "bad register line", id="wrong-registers"),
        pytest.param(replace_line(BUSY, "RSI", "RSI=0000000000000000 oops RBP=0000000000000000 "
                                              "RSP=0000000000000000"), "unexpected 'oops'", id="junk-token"),
        pytest.param(BUSY.replace("EFER=", "RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000000 "
                                          "RDX=0000000000000000\nEFER=", 1),
                     "CPU#0 has RAX twice", id="duplicate-line"),
        pytest.param(replace_line(BUSY, "RSI", "ESI=00000000 EDI=00000000 EBP=00000000 ESP=00000000"),
                     "mixes 32- and 64-bit", id="mixed-widths"),
        pytest.param(replace_line(BUSY, "RIP", "RIP=ffffffffb0217a0b RFL=00000246 [---Z-P-] CPL=7 II=0 "
                                              "A20=1 SMM=0 HLT=1"), "bad RIP line", id="cpl-7"),
        pytest.param(replace_line(BUSY, "RIP", "RIP=ffffffffb0217a0b RFL=00000246"), "bad RIP line",
                     id="short-rip"),
        pytest.param(replace_line(BUSY, "CS ", "CS =0010 0000000000000000 ffffffff ffaf9b00"),
                     "outside 0x00ffff00", id="flag-bits"),
        pytest.param(replace_line(BUSY, "GDT", "GDT=     fffffe00 0000007f"), "mixes 32- and 64-bit",
                     id="gdt-width"),
        pytest.param(replace_line(BUSY, "EFER", "EFER=0000000000000001"), "EFER.LMA disagrees",
                     id="lma-disagrees"),
        pytest.param(replace_line(RESET, "EFER", "EFER=0000000000000500"), "EFER.LMA disagrees",
                     id="lma-without-long-format"),
        pytest.param(replace_line(BUSY, "IDT", "IDT=     fffffe0000000000 00000fff 1"), "bad IDT line",
                     id="idt-extra"),
        pytest.param(replace_line(BUSY, "CR0", "CR0=80050033 CR3=00000000021be000"), "bad control-register",
                     id="cr-line"),
        pytest.param(BUSY + "X" * 5000 + "\n", "line of 5000 characters", id="long-line"),
        pytest.param("\nCPU#0\n" + "DR7=0\n" * (MAX_TEXT // 6 + 1), "characters of output", id="huge"),
    ],
)
def test_hostile_or_odd_text(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_info_registers(text)


def test_skips_lines_it_does_not_need() -> None:
    """Lines of other QEMU configurations (AVX, AVX-512, APX, CCS, Code) are
    skipped; blank lines and trailing spaces too."""
    extra = ("YMM00=0000000000000000 0000000000000000 0000000000000000 0000000000000000\n"
             "Opmask00=0000000000000000 Opmask01=0000000000000000 Opmask02=0000000000000000\n"
             "R16=0000000000000000 R17=0000000000000000 R18=0000000000000000 R19=0000000000000000\n"
             "CCS=0000000000000000 CCD=0000000000000000 CCO=EFLAGS\nCode=0f 0b <90>\n   \n")
    text = BUSY.replace("EFER=", extra + "EFER=")
    assert parse_info_registers(text) == parse_info_registers(BUSY)
    assert parse_info_registers(BUSY.replace("\n", "  \n")) == parse_info_registers(BUSY)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_text_parses_or_raises_format_error(data: st.DataObject) -> None:
    """Any corruption of a real sample is either parsed or rejected with
    FormatError -- never another exception."""
    lines = BUSY.splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    cut = data.draw(st.integers(0, len(lines[i])))
    junk = data.draw(st.text(alphabet="0123456789abcdefxXCPU#RAXIPG= -[]\n", max_size=30))
    lines[i] = lines[i][:cut] + junk + lines[i][cut + data.draw(st.integers(0, 20)):]
    try:
        cpus = parse_info_registers("\n".join(lines))
    except FormatError:
        return
    assert all(isinstance(c, X86VCPU) for c in cpus)
    build_x86_notes(cpus, None)


def test_every_sample_vcpu_line_is_recognised() -> None:
    """The samples hold nothing we parse that differs between 7.2 and 10.0:
    the same line heads in the same order."""
    def heads(name: str) -> list[str]:
        return [re.split(r"[ =]", line, maxsplit=1)[0] for line in sample(name)[0].splitlines()]
    assert heads("qemu72-x86-busy") == heads("qemu100-x86-busy")
    assert heads("qemu72-x86-reset") == heads("qemu100-x86-reset")
