"""x86 ELF notes of a QEMU dump, built from HMP ``info registers -a``.

QEMU's ``dump-guest-memory`` (dump/dump.c, target/i386/arch_dump.c) writes
its PT_NOTE as, in ``CPU_FOREACH`` order (the order ``info registers -a``
prints the vCPUs in)::

    per vCPU   "CORE"  NT_PRSTATUS  elf_prstatus  pr_pid = cpu_index + 1
    per vCPU   "QEMU"  type 0       QEMUCPUState  (version 1, size 440)
    once       the guest's note, copied raw       "VMCOREINFO", type 0

Each note is ``Elf64_Nhdr`` (three little-endian u32; ``Elf32_Nhdr`` is the
same bytes, so an ELFCLASS32 dump has the same notes), the name padded to 4
bytes, the desc padded to 4 bytes, padding zero.  The ``elf_prstatus`` is
the x86-64 one (336 bytes, ``x86_64_user_regs_struct`` at offset 112) when
the *first* vCPU is in long mode (EFER.LMA) and the i386 one (144 bytes,
``x86_user_regs_struct`` at offset 72) otherwise -- the same test that makes
QEMU write ``e_machine`` EM_X86_64 or EM_386.

:func:`parse_info_registers` reads the text of ``info registers -a``
(target/i386/cpu-dump.c ``x86_cpu_dump_state``, QEMU 7.2 to 10.0) into
:class:`X86VCPU` records; :func:`build_x86_notes` turns them into the
PT_NOTE bytes.  On a paused guest the result equals QEMU's own notes byte
for byte except where ``info registers`` does not print what QEMU stores:

``kernel_gs_base`` (QEMUCPUState, the IA32_KERNEL_GS_BASE MSR)
    Not printed.  Written as 0 unless the caller passes it.  A Linux vCPU in
    kernel mode holds the *user* GS base there (0 for ordinary 64-bit
    processes, so the note is usually exact); a vCPU in user mode holds the
    kernel's per-CPU base there (QEMU's note then has a non-zero value).
    crash and drgn do not read it (it is there for Windows dump conversion).
segment ``flags`` bits 0-7 and 24-31 (QEMUCPUSegment of cs..gs, ldt, tr)
    Printed masked with ``0x00ffff00``.  Under TCG QEMU keeps the raw high
    descriptor word there, whose bits 0-7 and 24-31 are the descriptor's
    base bits 16-23 and 24-31; with ``tcg=True`` they are rebuilt from the
    printed base: for LDT and TR always, for the six segment registers when
    CR0.PE is set, the selector is not null and the base fits 32 bits (a
    base set through FS/GS_BASE MSRs on a null selector gets 0, as QEMU's
    null-selector load leaves).  Segments loaded in real mode and kept
    across the switch to protected mode, or a non-null FS/GS whose base was
    then rewritten through the MSR below 4 GiB, would differ.  KVM (and the
    other accelerators) build flags from the access rights only (bits
    8-23), so ``tcg=False`` keeps the printed value, which is then exact.
``selector``/``flags`` of GDT and IDT; ``cr[1]``
    Not printed; QEMU never sets them (``lgdt``/``lidt`` load base and
    limit only, CR1 does not exist): written as 0.
``orig_rax`` (prstatus)
    QEMU writes 0 (``/* FIXME */``); so do we.
vCPUs not printed in 64-bit format (not in 64-bit code: real, protected or
compatibility mode)
    QEMU prints only the low 32 bits of RAX..RSP, EIP and the segment bases
    and omits R8-R15; the missing bits are written as 0 and named in
    :attr:`X86VCPU.unknown`.  In legacy mode (no LMA) the GDT/IDT bases and
    CR2/CR3 are printed as 32 bits, which they are.
``rflags``
    QEMU prints ``cpu_compute_eflags()`` and stores ``env->eflags``; they are
    equal once the vCPU has left the TCG execution loop (paused guest).
``cr[0]``, ``cr[4]``
    Printed as 32 bits.  No CR0 bit above 31 exists; CR4 bit 32 (FRED, a
    KVM-only feature in QEMU) would be lost.

All input is bounded (:data:`MAX_TEXT`, :data:`MAX_CPUS`); anything that is
not ``info registers -a`` text raises :class:`FormatError` naming the line.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

from vmcorefs.core.cstruct import CStruct
from vmcorefs.errors import FormatError

NT_PRSTATUS = 1
#: ``info registers -a`` of 1024 vCPUs with AVX-512 is about 4 MiB.
MAX_TEXT = 16 << 20
MAX_CPUS = 4096
#: Bound on the VMCOREINFO desc (QEMU's MAX_GUEST_NOTE_SIZE).
MAX_GUEST_NOTE = 1 << 20

_NHDR = struct.Struct("<III")
_U64 = (1 << 64) - 1
EFER_LMA = 1 << 10
CR0_PE = 1 << 0


def elf_note(name: bytes, n_type: int, desc: bytes) -> bytes:
    """One ELF note as QEMU writes it: ``n_namesz`` counts the NUL, name and
    desc padded with zeros to 4 bytes."""
    name0 = name + b"\0"

    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return _NHDR.pack(len(name0), len(desc), n_type) + pad(name0) + pad(desc)


# --- the C structs of target/i386/arch_dump.c, as named records -----------

@dataclass(frozen=True)
class QEMUCPUSegment(CStruct):
    """``QEMUCPUSegment``: u32 selector, limit, flags, pad; u64 base (24 bytes)."""

    STRUCT = struct.Struct("<IIIIQ")
    selector: int
    limit: int
    flags: int
    pad: int
    base: int


#: QEMUCPUState field names, in struct order.
QEMU_CPUSTATE_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                      "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
QEMU_CPUSTATE_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
QEMUCPUSTATE_VERSION = 1
_QEMU_HEAD = struct.Struct("<II18Q")
_QEMU_TAIL = struct.Struct("<5QQ")


@dataclass(frozen=True)
class QEMUCPUState:
    """x86 ``QEMUCPUState`` (version 1, 440 bytes), the desc of a ``QEMU``
    note: u32 version, u32 size, u64 rax..r15, rip, rflags, ten
    :class:`QEMUCPUSegment` (cs ds es fs gs ss ldt tr gdt idt), u64 cr[5],
    u64 kernel_gs_base (the optional tail QEMU added in 3.0)."""

    regs: dict[str, int]              # QEMU_CPUSTATE_REGS -> value
    segments: dict[str, QEMUCPUSegment]  # QEMU_CPUSTATE_SEGMENTS -> segment
    cr: tuple[int, int, int, int, int]
    kernel_gs_base: int
    version: int = QEMUCPUSTATE_VERSION

    SIZE: ClassVar[int] = _QEMU_HEAD.size + 10 * QEMUCPUSegment.size() + _QEMU_TAIL.size

    def pack(self) -> bytes:
        head = _QEMU_HEAD.pack(self.version, self.SIZE, *(self.regs[n] for n in QEMU_CPUSTATE_REGS))
        segs = b"".join(self.segments[n].pack() for n in QEMU_CPUSTATE_SEGMENTS)
        return head + segs + _QEMU_TAIL.pack(*self.cr, self.kernel_gs_base)

    @classmethod
    def unpack(cls, desc: bytes) -> QEMUCPUState:
        """Parse a ``QEMU`` note's desc (raises :class:`FormatError` unless it
        is a 440-byte version-1 state)."""
        if len(desc) != cls.SIZE:
            raise FormatError(f"QEMU CPU-state note of {len(desc)} bytes (expected {cls.SIZE})")
        version, size, *regs = _QEMU_HEAD.unpack_from(desc)
        if version != QEMUCPUSTATE_VERSION or size != cls.SIZE:
            raise FormatError(f"QEMU CPU-state note version {version} size {size}")
        off = _QEMU_HEAD.size
        segments = {}
        for name in QEMU_CPUSTATE_SEGMENTS:
            segments[name] = QEMUCPUSegment.unpack_from(desc, off)
            off += QEMUCPUSegment.size()
        *cr, kgs = _QEMU_TAIL.unpack_from(desc, off)
        return cls(dict(zip(QEMU_CPUSTATE_REGS, regs)), segments,
                   (cr[0], cr[1], cr[2], cr[3], cr[4]), kgs, version)


@dataclass(frozen=True)
class X86_64UserRegs(CStruct):  # noqa: N801 (QEMU's/Linux's name)
    """``x86_64_user_regs_struct`` (Linux ``struct user_regs_struct``), 27 u64."""

    STRUCT = struct.Struct("<27Q")
    r15: int
    r14: int
    r13: int
    r12: int
    rbp: int
    rbx: int
    r11: int
    r10: int
    r9: int
    r8: int
    rax: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    orig_rax: int
    rip: int
    cs: int
    eflags: int
    rsp: int
    ss: int
    fs_base: int
    gs_base: int
    ds: int
    es: int
    fs: int
    gs: int


@dataclass(frozen=True)
class X86UserRegs(CStruct):
    """i386 ``x86_user_regs_struct`` (68 bytes; the ``__xs`` halves are 0)."""

    STRUCT = struct.Struct("<7I8H2I2H2I2H")
    ebx: int
    ecx: int
    edx: int
    esi: int
    edi: int
    ebp: int
    eax: int
    ds: int
    __ds: int
    es: int
    __es: int
    fs: int
    __fs: int
    gs: int
    __gs: int
    orig_eax: int
    eip: int
    cs: int
    __cs: int
    eflags: int
    esp: int
    ss: int
    __ss: int


#: ``x86_64_elf_prstatus``: pad1[32], u32 pid, pad2[76], regs, pad3[8].
X86_64_PRSTATUS_SIZE = 336
X86_64_PRSTATUS_PID = 32
X86_64_PRSTATUS_REGS = 112
#: i386 ``x86_elf_prstatus``: pad1[24], u32 pid, pad2[44], regs, pad3[4].
X86_PRSTATUS_SIZE = 144
X86_PRSTATUS_PID = 24
X86_PRSTATUS_REGS = 72


def _prstatus(size: int, pid_off: int, regs_off: int, pid: int, regs: CStruct) -> bytes:
    buf = bytearray(size)
    struct.pack_into("<I", buf, pid_off, pid)
    packed = regs.pack()
    buf[regs_off:regs_off + len(packed)] = packed
    return bytes(buf)


# --- info registers ---------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """One line of ``info registers``: a QEMU ``SegmentCache`` as printed
    (``flags`` masked with 0x00ffff00; GDT/IDT have selector and flags 0)."""

    selector: int
    base: int
    limit: int
    flags: int


@dataclass(frozen=True)
class X86VCPU:
    """One vCPU of ``info registers -a``: QEMU's ``CPUX86State`` as printed.

    ``code64`` is whether QEMU printed it in 64-bit format (HF_CS64: 64-bit
    code), ``lma`` whether EFER.LMA is set (long mode).  ``unknown`` names the
    QEMUCPUState fields (or ``rax[63:32]``-style parts) that the text did not
    give; :func:`build_x86_notes` writes 0 for them.
    """

    cpu_index: int
    regs: dict[str, int]          # rax..r15, rip, rflags (QEMU_CPUSTATE_REGS)
    segments: dict[str, Segment]  # es cs ss ds fs gs ldt tr gdt idt
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    cpl: int
    halted: bool
    code64: bool
    unknown: tuple[str, ...]

    @property
    def lma(self) -> bool:
        return bool(self.efer & EFER_LMA)


_CPU_HEADER = re.compile(r"CPU#(\d{1,6})")
_HEX = re.compile(r"[0-9a-f]+")
_GPR64 = (("RAX", "RBX", "RCX", "RDX"), ("RSI", "RDI", "RBP", "RSP"),
          ("R8", "R9", "R10", "R11"), ("R12", "R13", "R14", "R15"))
_GPR32 = (("EAX", "EBX", "ECX", "EDX"), ("ESI", "EDI", "EBP", "ESP"))
_SEG_NAMES = {"ES": "es", "CS": "cs", "SS": "ss", "DS": "ds", "FS": "fs", "GS": "gs",
              "LDT": "ldt", "TR": "tr"}
_TABLE_NAMES = {"GDT": "gdt", "IDT": "idt"}
_RIP_FLAGS = re.compile(r"\[[-DOSZAPC]{7}\]")
_STATUS = ("CPL", "II", "A20", "SMM", "HLT")
_MAX_LINE = 4096


def _short(line: str) -> str:
    return line if len(line) <= 120 else line[:117] + "..."


def _hex(token: str, widths: Iterable[int], line: str) -> int:
    if len(token) not in tuple(widths) or not _HEX.fullmatch(token):
        raise FormatError(f"info registers: bad hex field {_short(token)!r} in line {_short(line)!r}")
    return int(token, 16)


def _fields(line: str) -> list[tuple[str, str]]:
    """``NAME=VALUE`` tokens of a line (``R8 =`` written ``R8=``)."""
    out = []
    for token in line.replace(" =", "=").split():
        name, sep, value = token.partition("=")
        if not sep:
            raise FormatError(f"info registers: unexpected {_short(token)!r} in line {_short(line)!r}")
        out.append((name, value))
    return out


class _CPUParser:
    """Collects one vCPU's lines; every needed line exactly once."""

    def __init__(self, cpu_index: int) -> None:
        self.cpu_index = cpu_index
        self.regs: dict[str, int] = {}
        self.segments: dict[str, Segment] = {}
        self.seen: set[str] = set()
        self.code64: bool | None = None
        self.cpl_hlt: tuple[int, int] | None = None
        self.cr: tuple[int, int, int, int] | None = None
        self.efer: int | None = None
        self.lma_format: bool | None = None

    def _once(self, key: str, line: str) -> None:
        if key in self.seen:
            raise FormatError(f"info registers: CPU#{self.cpu_index} has {key} twice: {_short(line)!r}")
        self.seen.add(key)

    def _format(self, code64: bool, line: str) -> None:
        if self.code64 is None:
            self.code64 = code64
        elif self.code64 != code64:
            raise FormatError(f"info registers: CPU#{self.cpu_index} mixes 32- and 64-bit lines: {_short(line)!r}")

    def _table_format(self, lma: bool, line: str) -> None:
        if self.lma_format is None:
            self.lma_format = lma
        elif self.lma_format != lma:
            raise FormatError(f"info registers: CPU#{self.cpu_index} mixes 32- and 64-bit lines: {_short(line)!r}")

    def line(self, line: str) -> None:
        head = line.replace(" =", "=").split("=", 1)[0].strip()
        for group in (*_GPR64, *_GPR32):
            if head == group[0]:
                return self._gprs(group, line)
        if head in ("RIP", "EIP"):
            return self._rip(head, line)
        if head in _SEG_NAMES:
            return self._segment(head, line)
        if head in _TABLE_NAMES:
            return self._table(head, line)
        if head == "CR0":
            return self._crs(line)
        if head == "EFER":
            return self._efer(line)
        return None  # DR*, FPU, XMM/YMM/ZMM, Opmask, CCS, R16-R31, Code: not needed

    def _gprs(self, group: tuple[str, ...], line: str) -> None:
        self._once(group[0], line)
        code64 = group in _GPR64
        self._format(code64, line)
        toks = _fields(line)
        if [n for n, _ in toks] != list(group):
            raise FormatError(f"info registers: bad register line {_short(line)!r}")
        for name, value in toks:
            key = name.lower() if code64 else "r" + name[1:].lower()  # EAX -> rax
            self.regs[key] = _hex(value, (16,) if code64 else (8,), line)

    def _rip(self, head: str, line: str) -> None:
        self._once("RIP", line)
        code64 = head == "RIP"
        self._format(code64, line)
        parts = line.replace(" =", "=").split()
        if len(parts) != 8 or not _RIP_FLAGS.fullmatch(parts[2]):
            raise FormatError(f"info registers: bad {head} line {_short(line)!r}")
        rip = _fields(parts[0])[0][1]
        name, rfl = _fields(parts[1])[0]
        if name != ("RFL" if code64 else "EFL"):
            raise FormatError(f"info registers: bad {head} line {_short(line)!r}")
        status = _fields(" ".join(parts[3:]))
        if [n for n, _ in status] != list(_STATUS) or not all(v.isdigit() and len(v) == 1 for _, v in status):
            raise FormatError(f"info registers: bad {head} line {_short(line)!r}")
        self.regs["rip"] = _hex(rip, (16,) if code64 else (8,), line)
        self.regs["rflags"] = _hex(rfl, (8,), line)
        cpl, hlt = int(status[0][1]), int(status[4][1])
        if cpl > 3 or hlt > 1:
            raise FormatError(f"info registers: bad {head} line {_short(line)!r}")
        self.cpl_hlt = (cpl, hlt)

    def _segment(self, head: str, line: str) -> None:
        self._once(head, line)
        parts = line.replace(" =", "=").split()
        if len(parts) < 4 or not parts[0].startswith(head + "="):
            raise FormatError(f"info registers: bad segment line {_short(line)!r}")
        selector = _hex(parts[0][len(head) + 1:], (4,), line)
        base = _hex(parts[1], (8, 16), line)
        self._format(len(parts[1]) == 16, line)
        limit = _hex(parts[2], (8,), line)
        flags = _hex(parts[3], (8,), line)
        if flags & ~0x00FFFF00:
            raise FormatError(f"info registers: segment flags outside 0x00ffff00 in {_short(line)!r}")
        self.segments[_SEG_NAMES[head]] = Segment(selector, base, limit, flags)

    def _table(self, head: str, line: str) -> None:
        self._once(head, line)
        parts = line.split()
        if len(parts) != 3 or parts[0] != head + "=":
            raise FormatError(f"info registers: bad {head} line {_short(line)!r}")
        base = _hex(parts[1], (8, 16), line)
        self._table_format(len(parts[1]) == 16, line)
        self.segments[_TABLE_NAMES[head]] = Segment(0, base, _hex(parts[2], (8,), line), 0)

    def _efer(self, line: str) -> None:
        self._once("EFER", line)
        toks = _fields(line)
        if len(toks) != 1:
            raise FormatError(f"info registers: bad EFER line {_short(line)!r}")
        self.efer = _hex(toks[0][1], (16,), line)

    def _crs(self, line: str) -> None:
        self._once("CR0", line)
        toks = _fields(line)
        if [n for n, _ in toks] != ["CR0", "CR2", "CR3", "CR4"]:
            raise FormatError(f"info registers: bad control-register line {_short(line)!r}")
        lma = len(toks[1][1]) == 16
        self._table_format(lma, line)
        wide = (16,) if lma else (8,)
        self.cr = (_hex(toks[0][1], (8,), line), _hex(toks[1][1], wide, line),
                   _hex(toks[2][1], wide, line), _hex(toks[3][1], (8,), line))

    def finish(self) -> X86VCPU:
        need = ["RIP", "CR0", "EFER", *_SEG_NAMES, *_TABLE_NAMES]
        need += [g[0] for g in (_GPR64 if self.code64 else _GPR32)]
        missing = [k for k in need if k not in self.seen]
        if missing:
            raise FormatError(f"info registers: CPU#{self.cpu_index} lacks {', '.join(missing)}")
        assert self.cr is not None and self.efer is not None and self.cpl_hlt is not None
        if self.code64 and not self.lma_format:
            raise FormatError(f"info registers: CPU#{self.cpu_index} prints 64-bit registers outside long mode")
        if bool(self.efer & EFER_LMA) != bool(self.lma_format):
            raise FormatError(f"info registers: CPU#{self.cpu_index} EFER.LMA disagrees with the GDT/CR line format")
        unknown: list[str] = []
        if not self.code64:
            for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip"):
                unknown.append(f"{r}[63:32]")
            for i in range(8, 16):
                self.regs[f"r{i}"] = 0
                unknown.append(f"r{i}")
            if self.lma_format:  # compatibility mode: 64-bit bases printed as 32 bits
                unknown += [f"{s}.base[63:32]" for s in ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr")]
        unknown.append("kernel_gs_base")
        cpl, hlt = self.cpl_hlt
        return X86VCPU(self.cpu_index, self.regs, self.segments, *self.cr, efer=self.efer, cpl=cpl,
                       halted=bool(hlt), code64=bool(self.code64), unknown=tuple(unknown))


def parse_info_registers(text: str) -> list[X86VCPU]:
    """Parse HMP ``info registers -a`` (x86) into vCPU records, in print order.

    Each vCPU starts with a ``CPU#N`` line.  Lines QEMU prints that the notes
    do not need (DR*, FPU/SSE/AVX registers, APX R16-R31, CCS, Code) are
    skipped; every needed line (general registers, RIP/EIP, ES..GS, LDT, TR,
    GDT, IDT, CR0-CR4, EFER) must be present exactly once and well formed.
    Raises :class:`FormatError` naming the offending line (HMP error text,
    truncated or hostile output, more than :data:`MAX_CPUS` vCPUs or
    :data:`MAX_TEXT` characters).
    """
    if len(text) > MAX_TEXT:
        raise FormatError(f"info registers: {len(text)} characters of output (limit {MAX_TEXT})")
    cpus: list[X86VCPU] = []
    current: _CPUParser | None = None
    seen: set[int] = set()
    for raw in text.splitlines():
        line = raw.rstrip()
        if len(line) > _MAX_LINE:
            raise FormatError(f"info registers: line of {len(line)} characters: {_short(line)!r}")
        if not line:
            continue
        if m := _CPU_HEADER.fullmatch(line):
            if current is not None:
                cpus.append(current.finish())
            index = int(m.group(1))
            if index in seen or len(seen) >= MAX_CPUS:
                raise FormatError(f"info registers: duplicate or too many vCPUs at {_short(line)!r}")
            seen.add(index)
            current = _CPUParser(index)
        elif current is None:
            raise FormatError(f"info registers -a: expected a CPU#N line, got {_short(line)!r}")
        else:
            current.line(line)
    if current is None:
        raise FormatError("info registers -a: no vCPU in the output")
    cpus.append(current.finish())
    return cpus


# --- the notes --------------------------------------------------------------

def _descriptor_flags(name: str, seg: Segment, cr0: int) -> int:
    """TCG's raw descriptor word: printed flags plus base bits 16-31 where
    QEMU loaded the segment from a descriptor (see the module docstring)."""
    from_descriptor = name in ("ldt", "tr") or (
        cr0 & CR0_PE and seg.selector & 0xFFFC and seg.base < 1 << 32)
    if not from_descriptor:
        return seg.flags
    return seg.flags | ((seg.base >> 16) & 0xFF) | (((seg.base >> 24) & 0xFF) << 24)


def qemu_cpu_state(cpu: X86VCPU, *, tcg: bool = True, kernel_gs_base: int = 0) -> QEMUCPUState:
    """The ``QEMUCPUState`` QEMU would write for this vCPU (see the module
    docstring for ``tcg`` and the fields that are guessed)."""
    segments = {}
    for name in QEMU_CPUSTATE_SEGMENTS:
        seg = cpu.segments[name]
        flags = _descriptor_flags(name, seg, cpu.cr0) if tcg and name not in _TABLE_NAMES.values() else seg.flags
        segments[name] = QEMUCPUSegment(seg.selector, seg.limit, flags, 0, seg.base)
    return QEMUCPUState(dict(cpu.regs), segments, (cpu.cr0, 0, cpu.cr2, cpu.cr3, cpu.cr4),
                        kernel_gs_base & _U64)


def x86_64_user_regs(cpu: X86VCPU) -> X86_64UserRegs:
    """``x86_64_user_regs_struct`` as arch_dump.c fills it (orig_rax 0)."""
    r, s = cpu.regs, cpu.segments
    return X86_64UserRegs(
        r["r15"], r["r14"], r["r13"], r["r12"], r["rbp"], r["rbx"], r["r11"], r["r10"],
        r["r9"], r["r8"], r["rax"], r["rcx"], r["rdx"], r["rsi"], r["rdi"], 0,
        r["rip"], s["cs"].selector, r["rflags"], r["rsp"], s["ss"].selector,
        s["fs"].base, s["gs"].base, s["ds"].selector, s["es"].selector,
        s["fs"].selector, s["gs"].selector)


def x86_user_regs(cpu: X86VCPU) -> X86UserRegs:
    """i386 ``x86_user_regs_struct`` as arch_dump.c fills it (low 32 bits)."""
    r, s = cpu.regs, cpu.segments
    m = 0xFFFFFFFF
    return X86UserRegs(
        r["rbx"] & m, r["rcx"] & m, r["rdx"] & m, r["rsi"] & m, r["rdi"] & m, r["rbp"] & m,
        r["rax"] & m, s["ds"].selector, 0, s["es"].selector, 0, s["fs"].selector, 0,
        s["gs"].selector, 0, 0, r["rip"] & m, s["cs"].selector, 0, r["rflags"] & m,
        r["rsp"] & m, s["ss"].selector, 0)


def prstatus_desc(cpu: X86VCPU, x86_64: bool) -> bytes:
    """The ``CORE``/NT_PRSTATUS desc of a vCPU: ``pr_pid`` = cpu_index + 1."""
    pid = cpu.cpu_index + 1
    if x86_64:
        return _prstatus(X86_64_PRSTATUS_SIZE, X86_64_PRSTATUS_PID, X86_64_PRSTATUS_REGS, pid,
                         x86_64_user_regs(cpu))
    return _prstatus(X86_PRSTATUS_SIZE, X86_PRSTATUS_PID, X86_PRSTATUS_REGS, pid, x86_user_regs(cpu))


def vmcoreinfo_note(desc: bytes | str) -> bytes:
    """The guest's ``VMCOREINFO`` note as Linux writes it (type 0) and QEMU
    copies it: ``desc`` is the KEY=VALUE text exactly as the note's desc
    (a ``str`` must be ASCII, as Linux's is)."""
    if isinstance(desc, str):
        try:
            desc = desc.encode("ascii")
        except UnicodeEncodeError as e:
            raise FormatError(f"VMCOREINFO text is not ASCII (at character {e.start})") from None
    if len(desc) > MAX_GUEST_NOTE:
        raise FormatError(f"VMCOREINFO of {len(desc)} bytes (QEMU's limit is {MAX_GUEST_NOTE})")
    return elf_note(b"VMCOREINFO", 0, desc)


def build_x86_notes(cpus: Sequence[X86VCPU], vmcoreinfo: bytes | str | None = None, *, tcg: bool = True,
                    kernel_gs_base: Sequence[int] | None = None) -> bytes:
    """PT_NOTE bytes of QEMU's x86 ``dump-guest-memory`` for these vCPUs.

    ``cpus`` in ``info registers -a`` order; ``vmcoreinfo`` the desc of the
    guest's VMCOREINFO note, bytes or ASCII text (None: no note); ``tcg`` whether QEMU runs
    the guest with TCG (segment flags, see the module docstring);
    ``kernel_gs_base`` one value per vCPU when the caller knows them (else
    0).  The x86-64 prstatus is used when ``cpus[0]`` is in long mode, the
    i386 one otherwise, as QEMU does.  Size: 816 bytes per vCPU for x86-64
    (356 + 460; 624 for i386) plus the VMCOREINFO note.
    """
    if not cpus:
        raise FormatError("no vCPUs to write notes for")
    if kernel_gs_base is not None and len(kernel_gs_base) != len(cpus):
        raise ValueError("kernel_gs_base needs one value per vCPU")
    x86_64 = cpus[0].lma
    out = [elf_note(b"CORE", NT_PRSTATUS, prstatus_desc(cpu, x86_64)) for cpu in cpus]
    for i, cpu in enumerate(cpus):
        kgs = kernel_gs_base[i] if kernel_gs_base is not None else 0
        out.append(elf_note(b"QEMU", 0, qemu_cpu_state(cpu, tcg=tcg, kernel_gs_base=kgs).pack()))
    if vmcoreinfo is not None:
        out.append(vmcoreinfo_note(vmcoreinfo))
    return b"".join(out)
