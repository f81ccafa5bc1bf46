"""The guest kernel's own VMCOREINFO, found in guest RAM (pure: no I/O).

QEMU's notes carry a ``VMCOREINFO`` note only when the guest has
``-device vmcoreinfo`` *and* its ``qemu_fw_cfg`` driver told QEMU where the
note is.  Linux keeps the same data in RAM anyway (kernel/crash_core.c,
kernel/vmcore_info.c since 6.9), in two allocations made at boot by
``crash_save_vmcoreinfo_init`` (a ``subsys_initcall``) since Linux 4.13:

``vmcoreinfo_data`` -- the *text form*
    ``get_zeroed_page()``: page-aligned ``KEY=VALUE\\n`` lines starting
    with ``OSRELEASE=``, ``vmcoreinfo_size`` bytes (at most
    ``VMCOREINFO_BYTES``, PAGE_SIZE), then zeros.

``vmcoreinfo_note`` -- the *note form*
    ``alloc_pages_exact(VMCOREINFO_NOTE_SIZE, __GFP_ZERO)``, page-aligned
    and physically contiguous, filled by ``update_vmcoreinfo_note``::

        Elf64_Nhdr { n_namesz = 11, n_descsz = vmcoreinfo_size, n_type = 0 }
        "VMCOREINFO\\0" + 1 byte of padding          (offset 12)
        desc = vmcoreinfo_data[0:vmcoreinfo_size]    (offset 24, padded to 4)
        Elf64_Nhdr { 0, 0, 0 }                       (final_note)

    This is the note whose address the guest hands QEMU's device
    (``paddr_vmcoreinfo_note``): QEMU's ``VMCOREINFO`` note has this desc.

Both hold the same text (``CRASHTIME=`` is appended to both only when the
kernel crashes).  :func:`find_hits` spots page starts that look like either
form, :func:`parse_copy` checks one copy's bytes, :func:`validate` checks its
values against the *running* kernel, and :func:`select` picks one.

Stale copies are common: after a reboot or kexec the previous kernel's pages
stay in RAM until reused, and the guest's page cache may hold files that
start like VMCOREINFO.  Nothing found in RAM is trusted until
:func:`validate` has checked it against the live page tables taken from a
vCPU's CR3 (independent of the candidate):

* ``SYMBOL(_stext)``, ``SYMBOL(init_uts_ns)`` and ``SYMBOL(init_top_pgt)``
  map, through the vCPU's page tables, to the physical address
  ``__pa_symbol`` gives with the candidate's ``NUMBER(phys_base)``;
* ``KERNELOFFSET`` (KASLR) puts ``_stext`` at a 2 MiB-aligned start inside
  the kernel image (x86-64 ``CONFIG_PHYSICAL_ALIGN`` is a multiple of 2 MiB;
  ``CONFIG_PHYSICAL_START`` is not known, so a forged KERNELOFFSET off by a
  multiple of 2 MiB passes -- but a forged copy is alone, and Linux's pair
  wins, see below);
* the live ``init_uts_ns`` holds ``sysname`` ``Linux`` and ``release`` equal
  to ``OSRELEASE`` (so two kernels with identical layouts still differ);
* the page-table root the candidate names (``init_top_pgt``, what kcore
  walks) maps ``_stext`` the same way.

Which copy wins (:func:`select`), among copies that validate: copies are
grouped by text; a text held in both forms (what Linux keeps) beats one held
only as a note, which beats one held only as text; among equals, the one
whose first copy has the lowest guest-physical address.  The result names
the note's address when there is one (what ``-device vmcoreinfo`` would have
been told); the note's ``n_descsz`` also gives the text's exact length,
which a text copy cut short by a hole at a line boundary would not.
Different valid texts agree on everything checked above (release,
``phys_base``, the symbols' places); they may differ elsewhere
(``CRASHTIME``, a forged value), so the choice is a tie-break, and the
others are reported.  :class:`Finder` ties the steps together.

x86-64 only (the keys and ``__START_KERNEL_map`` are x86-64's).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vmcorefs.core.layout import PAGE_SIZE
from vmcorefs.core.paging import (CR4_LA57, START_KERNEL_MAP, ReadPhys, cr3_to_root, kernel_root_from_vmcoreinfo,
                                   walk)
from vmcorefs.errors import FormatError, GuestMemoryError

#: Largest VMCOREINFO text accepted: Linux's ``VMCOREINFO_BYTES`` is
#: PAGE_SIZE (4 KiB on x86-64); a 2026 patch ("vmcoreinfo: increase
#: vmcoreinfo buffer to 8KB") makes it 8 KiB, two pages.
MAX_TEXT = 8192
#: The text form starts with this (``VMCOREINFO_OSRELEASE`` comes first).
TEXT_MAGIC = b"OSRELEASE="
#: ``VMCOREINFO_NOTE_NAME`` with its NUL: ``n_namesz`` is 11.
NOTE_NAME = b"VMCOREINFO\0"
NHDR = struct.Struct("<III")
#: Where the note's name and desc start in its page (header 12, name 12).
NOTE_NAME_OFFSET = NHDR.size
NOTE_DESC_OFFSET = NHDR.size + 12
#: Bytes to read at a hit to parse either form (note header + desc + final note).
COPY_SPAN = NOTE_DESC_OFFSET + MAX_TEXT + NHDR.size

#: x86-64 ``CONFIG_PHYSICAL_ALIGN`` is a multiple of 2 MiB: so are the
#: kernel's start (``__START_KERNEL``) and the KASLR offset.
KERNEL_ALIGN = 2 << 20
#: ``KERNEL_IMAGE_SIZE`` when VMCOREINFO does not say (1 GiB with KASLR).
DEFAULT_KERNEL_IMAGE_SIZE = 1 << 30
#: ``struct new_utsname``: six ``char[65]``; ``release`` is the third.
UTS_FIELD = 65
UTS_RELEASE = 2 * UTS_FIELD
#: Offsets of ``name`` in ``struct uts_namespace`` to try when VMCOREINFO
#: has no ``OFFSET(uts_namespace.name)`` (before Linux 5.x: after a kref).
UTS_NAME_OFFSETS = (0, 4, 8)
#: PTI: a user-mode CR3 points at the user half of an 8 KiB PGD pair; the
#: kernel's PGD is the same address with this bit clear.
PTI_USER_PGD = 1 << 12

#: Guest-controlled text: keys as Linux writes them, printable values.
_LINES = re.compile(rb"(?:[A-Za-z0-9_().\-]{1,128}=[\x20-\x7e]{0,512}\n)+")
_RELEASE = re.compile(r"[\x21-\x7e]{1,64}")
_HEX = re.compile(r"(?:0x)?([0-9a-fA-F]{1,16})")
_DEC = re.compile(r"-?[0-9]{1,20}")
_U64 = 1 << 64

#: Kernel-virtual address -> guest-physical address, or None (unmapped).
Translate = Callable[[int], "int | None"]


@dataclass(frozen=True)
class Hit:
    """A page start at ``gpa`` that begins like a VMCOREINFO copy."""

    gpa: int
    form: str  # "note" or "text"


@dataclass(frozen=True)
class Candidate:
    """A well-formed copy of VMCOREINFO at guest-physical ``gpa``."""

    gpa: int
    form: str  # "note" or "text"
    text: str
    fields: Mapping[str, str] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Rejected:
    """A copy at ``gpa`` that is not the running kernel's, and why."""

    gpa: int
    form: str
    reason: str


@dataclass(frozen=True)
class ScanStats:
    """What a scan cost.  ``complete`` is False when a bound stopped it
    (or it stopped at the first validated pair, see ``stopped``)."""

    bytes_read: int = 0
    bytes_skipped: int = 0  # never populated (holes, untouched or zero pages)
    swapped_read: int = 0  # bytes read from pages the host had swapped out
    hits: int = 0
    seconds: float = 0.0
    complete: bool = True
    stopped: str = ""  # why the scan ended early, "" when it ran to the end


@dataclass(frozen=True)
class Found:
    """VMCOREINFO of the running kernel.

    ``gpa``/``form``: the chosen copy (the note when there is one);
    ``twin_gpa``: a copy of the other form holding the same text, if seen;
    ``others``: other valid copies not chosen (distinct texts or places);
    ``rejected``: copies that failed :func:`parse_copy` or :func:`validate`
    (at most :data:`MAX_REPORTED`).
    """

    text: str
    gpa: int
    form: str
    twin_gpa: int | None = None
    others: tuple[Candidate, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    stats: ScanStats = ScanStats()


@dataclass(frozen=True)
class NotFound:
    """No usable VMCOREINFO; ``reason`` is one line for users."""

    reason: str
    rejected: tuple[Rejected, ...] = ()
    stats: ScanStats = ScanStats()


#: Bound on the rejected copies a result lists.
MAX_REPORTED = 32


def find_hits(buf: bytes | bytearray, gpa: int) -> list[Hit]:
    """Page starts in ``buf`` (guest memory from page-aligned ``gpa``) that
    begin like a copy: ``OSRELEASE=`` at offset 0 (text form), or a note
    header with ``n_namesz`` 11, ``n_type`` 0, ``0 < n_descsz <= MAX_TEXT``
    and the name ``VMCOREINFO`` (note form).  Sorted by address.

    Only page starts are looked at: the first byte of every page (and the
    first byte of the name) is picked out with one strided slice, and only
    pages where it matches are compared in full -- a few milliseconds per
    GiB, at most two comparisons per page whatever ``buf`` holds.  Raises
    ValueError when ``gpa`` is not page-aligned.
    """
    if gpa % PAGE_SIZE:
        raise ValueError(f"buffer address {gpa:#x} is not page-aligned")
    hits: list[Hit] = []
    starts = buf[0::PAGE_SIZE]
    i = starts.find(TEXT_MAGIC[:1])
    while i >= 0:
        if buf.startswith(TEXT_MAGIC, i * PAGE_SIZE):
            hits.append(Hit(gpa + i * PAGE_SIZE, "text"))
        i = starts.find(TEXT_MAGIC[:1], i + 1)
    names = buf[NOTE_NAME_OFFSET::PAGE_SIZE]
    i = names.find(NOTE_NAME[:1])
    while i >= 0:
        page = i * PAGE_SIZE
        if buf.startswith(NOTE_NAME, page + NOTE_NAME_OFFSET):
            namesz, descsz, ntype = NHDR.unpack_from(buf, page)
            if namesz == len(NOTE_NAME) and ntype == 0 and 0 < descsz <= MAX_TEXT:
                hits.append(Hit(gpa + page, "note"))
        i = names.find(NOTE_NAME[:1], i + 1)
    hits.sort(key=lambda h: h.gpa)
    return hits


def parse_copy(data: bytes, gpa: int, form: str) -> Candidate | Rejected:
    """Check the bytes of one copy (``data`` from ``gpa``; bytes missing at
    the end read as zeros, so pass :data:`COPY_SPAN` bytes when you can).

    Text form: the text runs to the first NUL within :data:`MAX_TEXT` bytes.
    Note form: header as in the module docstring, desc of ``n_descsz``
    bytes with no NUL, then a zero ``final_note`` header.  Either way the
    text must be ``KEY=VALUE\\n`` lines of printable ASCII, the first
    ``OSRELEASE=`` a plausible release (1..64 visible characters), with a
    ``PAGESIZE`` that is a power of two.
    """
    if form == "text":
        raw = data[:MAX_TEXT]
        end = raw.find(b"\0")
        if end < 0:
            return Rejected(gpa, form, f"no NUL within {MAX_TEXT} bytes")
        raw = raw[:end]
    elif form == "note":
        head = data[:NOTE_DESC_OFFSET].ljust(NOTE_DESC_OFFSET, b"\0")
        namesz, descsz, ntype = NHDR.unpack_from(head)
        if namesz != len(NOTE_NAME) or ntype != 0 or head[NOTE_NAME_OFFSET:NOTE_NAME_OFFSET + 12] != NOTE_NAME + b"\0":
            return Rejected(gpa, form, "not a VMCOREINFO note header")
        if not 0 < descsz <= MAX_TEXT:
            return Rejected(gpa, form, f"n_descsz {descsz} is not in 1..{MAX_TEXT}")
        raw = data[NOTE_DESC_OFFSET:NOTE_DESC_OFFSET + descsz]
        if len(raw) < descsz or b"\0" in raw:
            return Rejected(gpa, form, f"desc is shorter than n_descsz {descsz} (NUL at {raw.find(0)})")
        tail = NOTE_DESC_OFFSET + descsz + (-descsz % 4)
        final = data[tail:tail + NHDR.size].ljust(NHDR.size, b"\0")
        if final != bytes(NHDR.size):
            return Rejected(gpa, form, "no empty note after the desc (final_note)")
    else:
        raise ValueError(f"form must be 'note' or 'text', not {form!r}")
    problem = _text_problem(raw)
    if problem:
        return Rejected(gpa, form, problem)
    text = raw.decode("ascii")
    return Candidate(gpa, form, text, parse_fields(text))


def _text_problem(raw: bytes) -> str:
    if not raw.startswith(TEXT_MAGIC):
        return "does not start with OSRELEASE="
    if not _LINES.fullmatch(raw):
        return "not KEY=VALUE lines of printable ASCII ending in a newline"
    fields = parse_fields(raw.decode("ascii"))
    if not _RELEASE.fullmatch(fields.get("OSRELEASE", "")):
        return "OSRELEASE is not 1..64 visible characters"
    size = fields.get("PAGESIZE", "")
    if not size.isdigit() or len(size) > 8 or int(size) < PAGE_SIZE or int(size) & (int(size) - 1):
        return f"PAGESIZE={size[:20]!r} is not a power of two >= {PAGE_SIZE}"
    return ""


def parse_fields(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines into a dict (first wins), like the kernel's
    readers (makedumpfile, crash, drgn) take them."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            out.setdefault(key, value)
    return out


def _hex(fields: Mapping[str, str], key: str) -> int:
    m = _HEX.fullmatch(fields.get(key, ""))
    if not m:
        raise FormatError(f"{key} is {'missing' if key not in fields else 'not hex'}")
    return int(m.group(1), 16)


def _dec(fields: Mapping[str, str], key: str) -> int:
    value = fields.get(key, "")
    if not _DEC.fullmatch(value):
        raise FormatError(f"{key} is {'missing' if key not in fields else 'not decimal'}")
    return int(value)


def pa_symbol(vaddr: int, phys_base: int) -> int:
    """Linux x86-64 ``__pa_symbol``: kernel-image ``vaddr`` -> physical."""
    return (vaddr - START_KERNEL_MAP + phys_base) % _U64


def validate(fields: Mapping[str, str], translate: Translate, read_phys: ReadPhys,
             phys_limit: int) -> str:
    """Why ``fields`` is not the running x86-64 kernel's VMCOREINFO, or ""
    when it is (checks in the module docstring, in that order; the first
    failure is returned).

    ``translate`` maps kernel-virtual addresses through the live page
    tables of a vCPU (:func:`translator`); ``read_phys`` reads guest
    memory (a short read is zero-padded, GuestMemoryError is a failure);
    ``phys_limit`` is the end of guest-physical memory.
    """
    try:
        stext = _hex(fields, "SYMBOL(_stext)")
        koff = _hex(fields, "KERNELOFFSET")
        phys_base = _dec(fields, "NUMBER(phys_base)")
        uts = _hex(fields, "SYMBOL(init_uts_ns)")
        image_size = _dec(fields, "NUMBER(KERNEL_IMAGE_SIZE)") if "NUMBER(KERNEL_IMAGE_SIZE)" in fields \
            else DEFAULT_KERNEL_IMAGE_SIZE
        uts_name = [_dec(fields, "OFFSET(uts_namespace.name)")] if "OFFSET(uts_namespace.name)" in fields \
            else list(UTS_NAME_OFFSETS)
    except FormatError as e:
        return str(e)
    if fields.get("PAGESIZE") != str(PAGE_SIZE):
        return f"PAGESIZE={fields.get('PAGESIZE')} is not x86-64's {PAGE_SIZE}"
    start = stext - koff - START_KERNEL_MAP
    if koff % KERNEL_ALIGN or start % KERNEL_ALIGN or not 0 <= start < image_size:
        return (f"KERNELOFFSET={koff:x} and SYMBOL(_stext)={stext:x} do not put the kernel at a"
                f" 2 MiB-aligned start of its image")
    syms = [("_stext", stext), ("init_uts_ns", uts)]
    if "SYMBOL(init_top_pgt)" in fields:
        try:
            syms.append(("init_top_pgt", _hex(fields, "SYMBOL(init_top_pgt)")))
        except FormatError as e:
            return str(e)
    for name, va in syms:
        want = pa_symbol(va, phys_base)
        got = translate(va)
        if got is None:
            return f"SYMBOL({name})={va:x} is not mapped by the live page tables"
        if got != want:
            return (f"SYMBOL({name})={va:x} is at guest-physical {got:#x} in the live page tables,"
                    f" not {want:#x} as NUMBER(phys_base)={phys_base} says (another kernel's copy?)")
    problem = _uts_problem(read_phys, pa_symbol(uts, phys_base), uts_name, fields["OSRELEASE"])
    if problem:
        return problem
    try:
        root, levels = kernel_root_from_vmcoreinfo(fields)
    except FormatError as e:
        return str(e)
    if translator(read_phys, [(root, levels)], phys_limit)(stext) != pa_symbol(stext, phys_base):
        return f"its own page-table root {root:#x} does not map SYMBOL(_stext) like the live ones"
    return ""


def _uts_problem(read_phys: ReadPhys, pa: int, offsets: Sequence[int], release: str) -> str:
    if not all(0 <= off < PAGE_SIZE for off in offsets):
        return f"OFFSET(uts_namespace.name)={offsets[0]} is implausible"
    span = max(offsets) + UTS_RELEASE + UTS_FIELD
    try:
        data = bytes(read_phys(pa, span)).ljust(span, b"\0")
    except GuestMemoryError as e:
        return f"init_uts_ns cannot be read: {e}"
    want = release.encode("ascii")
    for off in offsets:
        name = data[off:off + UTS_FIELD]
        got = data[off + UTS_RELEASE:off + UTS_RELEASE + UTS_FIELD].split(b"\0", 1)[0]
        if name.startswith(b"Linux\0") and got == want:
            return ""
    return f"the live init_uts_ns at guest-physical {pa:#x} does not hold release {release!r}"


def select(valid: Sequence[Candidate]) -> tuple[Candidate, int | None, tuple[Candidate, ...]]:
    """Pick the copy to use among validated ones (rule in the module
    docstring): ``(chosen, twin_gpa, others)``.  Raises ValueError when
    ``valid`` is empty."""
    if not valid:
        raise ValueError("no candidate to select from")
    groups: dict[str, list[Candidate]] = {}
    for c in sorted(valid, key=lambda c: c.gpa):
        groups.setdefault(c.text, []).append(c)

    def rank(copies: list[Candidate]) -> tuple[int, int]:
        forms = {c.form for c in copies}
        return (0 if forms == {"note", "text"} else 1 if "note" in forms else 2, copies[0].gpa)

    best = min(groups.values(), key=rank)
    notes = [c for c in best if c.form == "note"]
    texts = [c for c in best if c.form == "text"]
    chosen = (notes or texts)[0]
    twin = texts[0].gpa if notes and texts else None
    others = tuple(c for c in sorted(valid, key=lambda c: c.gpa)
                   if c is not chosen and c.gpa != twin)
    return chosen, twin, others


class Finder:
    """Finds the running kernel's VMCOREINFO in guest memory fed to it.

    Feed it populated guest memory in any order (:meth:`feed`); each hit is
    read whole with ``read_phys`` (so a copy may run past the buffer, into
    memory never fed: holes read as zeros), parsed, and validated once per
    distinct text.  :attr:`paired` turns True once Linux's pair (a note and
    a text copy with the same, valid text) has been seen -- a caller may
    stop there.  :meth:`result` applies :func:`select`.
    """

    def __init__(self, read_phys: ReadPhys, translate: Translate, phys_limit: int) -> None:
        self.read_phys = read_phys
        self.translate = translate
        self.phys_limit = phys_limit
        self.valid: list[Candidate] = []
        self.rejected: list[Rejected] = []
        self.hits = 0
        #: text -> "" (valid) or why not: each distinct text is validated once.
        self.verdicts: dict[str, str] = {}
        self.paired = False

    def feed(self, buf: bytes | bytearray, gpa: int) -> None:
        """Look at guest memory ``buf`` from page-aligned ``gpa``."""
        for hit in find_hits(buf, gpa):
            self.check(hit.gpa, hit.form)

    def check(self, gpa: int, form: str) -> None:
        """Read, parse and validate the copy of ``form`` at ``gpa``."""
        self.hits += 1
        try:
            data = bytes(self.read_phys(gpa, COPY_SPAN))
        except GuestMemoryError as e:
            self.rejected.append(Rejected(gpa, form, f"cannot be read: {e}"))
            return
        c = parse_copy(data, gpa, form)
        if isinstance(c, Rejected):
            self.rejected.append(c)
            return
        if c.text not in self.verdicts:
            self.verdicts[c.text] = validate(c.fields, self.translate, self.read_phys, self.phys_limit)
        why = self.verdicts[c.text]
        if why:
            self.rejected.append(Rejected(gpa, form, why))
            return
        self.valid.append(c)
        other = "text" if form == "note" else "note"
        self.paired = self.paired or any(v.form == other and v.text == c.text for v in self.valid)

    def result(self, stats: ScanStats = ScanStats(), where: str = "guest RAM") -> Found | NotFound:
        """:class:`Found` (per :func:`select`) or :class:`NotFound` with a
        one-line reason (a validation failure is preferred over a parse
        failure as the reason: it says more).  ``where`` names what was fed,
        for the message."""
        rejected = tuple(self.rejected[:MAX_REPORTED])
        if self.valid:
            chosen, twin, others = select(self.valid)
            return Found(chosen.text, chosen.gpa, chosen.form, twin, others, rejected, stats)
        early = f"; the scan stopped early: {stats.stopped}" if stats.stopped else ""
        if not self.rejected:
            return NotFound(f"no copy of VMCOREINFO in {where}{early}", rejected, stats)
        failed = [r for r in self.rejected if r.reason in self.verdicts.values()]
        first = (failed or self.rejected)[0]
        return NotFound(f"{len(self.rejected)} copies of VMCOREINFO in {where}, none is the running"
                        f" kernel's: at {first.gpa:#x}: {first.reason}{early}", rejected, stats)


class CPUState(Protocol):
    """What :func:`kernel_roots` needs of a vCPU (e.g. notes.X86CPUState)."""

    @property
    def cr3(self) -> int: ...

    @property
    def cr4(self) -> int: ...

    @property
    def in_kernel(self) -> bool: ...


def kernel_roots(cpus: Iterable[CPUState]) -> list[tuple[int, int]]:
    """``(root, levels)`` page-table roots to validate against, from the
    vCPUs' CR3/CR4: those of vCPUs in kernel mode first, then the others;
    last, for each CR3 with the PTI user bit set, its kernel twin (the bit
    cleared: a user-mode CR3 under PTI maps almost none of the kernel).
    Zero CR3s (paging off) are left out; duplicates too."""
    roots = [(cr3_to_root(c.cr3), 5 if c.cr4 & CR4_LA57 else 4)
             for c in sorted(cpus, key=lambda c: not c.in_kernel) if c.cr3]
    out: list[tuple[int, int]] = []
    for root, levels in roots + [(r & ~PTI_USER_PGD, n) for r, n in roots if r & PTI_USER_PGD]:
        if root and (root, levels) not in out:
            out.append((root, levels))
    return out


def translator(read_phys: ReadPhys, roots: Sequence[tuple[int, int]], phys_limit: int) -> Translate:
    """Translate kernel-virtual addresses through the first of ``roots``
    that maps them (the kernel half is the same in every address space of
    one kernel).  Each page costs one bounded walk per root (at most
    ``levels`` table reads); results are cached per page."""
    cache: dict[int, int | None] = {}

    def translate(vaddr: int) -> int | None:
        if not 0 <= vaddr < _U64:
            return None
        page = vaddr - vaddr % PAGE_SIZE
        if page not in cache:
            pa = None
            for root, levels in roots:
                w = walk(read_phys, root, levels=levels, phys_limit=phys_limit, start=page,
                         end=page + PAGE_SIZE, max_tables=2 * levels)
                pa = w.translate(page)
                if pa is not None:
                    break
            cache[page] = pa
        base = cache[page]
        return None if base is None else base + vaddr % PAGE_SIZE

    return translate
