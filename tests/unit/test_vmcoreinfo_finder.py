"""VMCOREINFO found in guest RAM (core/vmcoreinfo.py): hits, parsing, the
validator against live page tables, selection, the finder on synthetic
memory images (note and text forms, decoys, stale copies of other kernels,
copies straddling a hole, none)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paging_support import MiB2, PageTables
from vmcoreinfo_support import CPU, LIMIT, NHDR, Booted, Image, Kernel, boot, note_bytes, put_pair

from vmcorefs.core.layout import PAGE_SIZE
from vmcorefs.core.paging import START_KERNEL_MAP
from vmcorefs.core.vmcoreinfo import (
    COPY_SPAN,
    MAX_TEXT,
    NOTE_NAME,
    Candidate,
    Finder,
    Found,
    Hit,
    NotFound,
    Rejected,
    ScanStats,
    find_hits,
    kernel_roots,
    pa_symbol,
    parse_copy,
    parse_fields,
    select,
    translator,
    validate,
)
from vmcorefs.errors import GuestMemoryError

def finder_for(img: Image, *roots: int, levels: int = 4) -> Finder:
    return Finder(img.read, translator(img.read, [(r, levels) for r in roots], LIMIT), LIMIT)


def check_live(img: Image, b: Booted, text: str | None = None) -> str:
    fields = parse_fields(b.text if text is None else text)
    return validate(fields, translator(img.read, [(b.root, b.kernel.levels)], LIMIT), img.read, LIMIT)


# --- find_hits -----------------------------------------------------------------


def test_hits_only_at_page_starts() -> None:
    buf = bytearray(8 * PAGE_SIZE)
    buf[0:10] = b"OSRELEASE="                        # text form, page 0
    buf[PAGE_SIZE + 5:PAGE_SIZE + 15] = b"OSRELEASE="          # not at a page start
    buf[2 * PAGE_SIZE:2 * PAGE_SIZE + 24] = note_bytes("OSRELEASE=x\n")[:24]  # note form, page 2
    buf[3 * PAGE_SIZE + 500:3 * PAGE_SIZE + 524] = note_bytes("OSRELEASE=x\n")[:24]  # note not at a page start
    rodata = b"CRASHTIME=%lld\n\0VMCOREINFO\0OSRELEASE=%s\n\0"  # the kernel's format strings
    buf[4 * PAGE_SIZE + 0x1fa:4 * PAGE_SIZE + 0x1fa + len(rodata)] = rodata
    buf[5 * PAGE_SIZE:5 * PAGE_SIZE + 24] = note_bytes("x", namesz=12)[:24]  # wrong n_namesz
    buf[6 * PAGE_SIZE:6 * PAGE_SIZE + 24] = note_bytes("x", ntype=1)[:24]    # wrong n_type
    buf[7 * PAGE_SIZE:7 * PAGE_SIZE + 24] = note_bytes("x", descsz=MAX_TEXT + 1)[:24]
    assert find_hits(buf, 0x100000) == [Hit(0x100000, "text"), Hit(0x100000 + 2 * PAGE_SIZE, "note")]
    assert find_hits(bytes(buf), 0x100000) == find_hits(buf, 0x100000)


def test_hits_need_a_page_aligned_buffer() -> None:
    with pytest.raises(ValueError):
        find_hits(bytes(PAGE_SIZE), 0x100010)


def test_hits_in_a_hostile_buffer_are_bounded() -> None:
    """Memory full of both magics: one hit per page and form, no more."""
    page = (b"\x0b\0\0\0\x10\0\0\0\0\0\0\0" + NOTE_NAME + b"\0" + b"OSRELEASE=" * 500)[:PAGE_SIZE]
    page = b"OSRELEASE=\0\0" + page[12:]  # n_namesz is not 11 there: only text hits
    hits = find_hits(page * 64, 0)
    assert hits == [Hit(i * PAGE_SIZE, "text") for i in range(64)]
    noisy = (NOTE_NAME * 400)[:PAGE_SIZE]
    assert find_hits(noisy * 64, 0) == []


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hits_match_a_page_by_page_oracle(data: st.DataObject) -> None:
    npages = data.draw(st.integers(1, 6))
    background = data.draw(st.sampled_from(["zeros", "random"]))
    buf = bytearray(npages * PAGE_SIZE) if background == "zeros" else \
        bytearray(random.Random(data.draw(st.integers(0, 1 << 32))).randbytes(npages * PAGE_SIZE))
    pieces = [b"OSRELEASE=", NOTE_NAME, note_bytes("OSRELEASE=a\n")[:24], note_bytes("b", descsz=0)[:24]]
    for _ in range(data.draw(st.integers(0, 12))):
        piece = data.draw(st.sampled_from(pieces))
        at = data.draw(st.integers(0, len(buf) - len(piece)))
        if data.draw(st.booleans()):
            at -= at % PAGE_SIZE  # often at a page start
        buf[at:at + len(piece)] = piece
    want = []
    for p in range(0, len(buf), PAGE_SIZE):
        namesz, descsz, ntype = NHDR.unpack_from(buf, p)
        if buf[p + 12:p + 23] == NOTE_NAME and namesz == 11 and ntype == 0 and 0 < descsz <= MAX_TEXT:
            want.append(Hit(p, "note"))
        if buf[p:p + 10] == b"OSRELEASE=":
            want.append(Hit(p, "text"))
    assert sorted(find_hits(buf, 0), key=lambda h: (h.gpa, h.form)) == sorted(want, key=lambda h: (h.gpa, h.form))


# --- parse_copy ----------------------------------------------------------------

GOOD = "OSRELEASE=6.1.0-57-cloud-amd64\nPAGESIZE=4096\nSYMBOL(_stext)=ffffffff81000000\n"


@pytest.mark.parametrize("form, data, reason", [
    ("text", GOOD.encode() + bytes(100), None),
    ("note", note_bytes(GOOD), None),
    ("text", b"OSRELEASE=x\n" + b"A" * MAX_TEXT, "no NUL"),
    ("text", b"OSRELEASE=6.1\nPAGESIZE=4096\nbinary\x01junk\n\0", "KEY=VALUE lines"),
    ("text", b"OSRELEASE=6.1\nPAGESIZE=4096\nno equals sign\n\0", "KEY=VALUE lines"),
    ("text", b"OSRELEASE=6.1\nPAGESIZE=4096\0", "KEY=VALUE lines"),  # no final newline
    ("text", b"OSRELEASE=\nPAGESIZE=4096\n\0", "OSRELEASE is not"),
    ("text", b"OSRELEASE=" + b"9" * 65 + b"\nPAGESIZE=4096\n\0", "OSRELEASE is not"),
    ("text", b"OSRELEASE=6.1 x\nPAGESIZE=4096\n\0", "OSRELEASE is not"),
    ("text", b"OSRELEASE=6.1\nSYMBOL(_stext)=1\n\0", "PAGESIZE"),
    ("text", b"OSRELEASE=6.1\nPAGESIZE=4095\n\0", "PAGESIZE"),
    ("text", b"OSRELEASE=6.1\nPAGESIZE=2048\n\0", "PAGESIZE"),
    ("text", b"PAGESIZE=4096\nOSRELEASE=6.1\n\0", "does not start"),
    ("note", note_bytes(GOOD)[:20], "not a VMCOREINFO note header"),
    ("note", note_bytes(GOOD, namesz=10), "not a VMCOREINFO note header"),
    ("note", note_bytes(GOOD, ntype=1), "not a VMCOREINFO note header"),
    ("note", note_bytes(GOOD, descsz=0), "n_descsz 0"),
    ("note", note_bytes(GOOD, descsz=MAX_TEXT + 4), "n_descsz"),
    ("note", note_bytes(GOOD, descsz=len(GOOD) + 8), "shorter than n_descsz"),
    ("note", note_bytes(GOOD, descsz=len(GOOD) - 1), "final_note"),
    ("note", note_bytes(GOOD[:-1] + "\n\0\0\0")[:-12] + bytes(12), "shorter than n_descsz"),
    ("note", note_bytes(GOOD, final=False), "final_note"),
    ("note", note_bytes(GOOD.replace("OSRELEASE", "OSRELEASf")), "does not start"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_parse_copy(form: str, data: bytes, reason: str | None) -> None:
    c = parse_copy(data, 0x5000, form)
    if reason is None:
        assert isinstance(c, Candidate) and c.text == GOOD and c.gpa == 0x5000 and c.form == form
        assert c.fields["SYMBOL(_stext)"] == "ffffffff81000000"
    else:
        assert isinstance(c, Rejected) and reason in c.reason, c
        assert (c.gpa, c.form) == (0x5000, form)


def test_parse_copy_rejects_unknown_forms() -> None:
    with pytest.raises(ValueError):
        parse_copy(b"", 0, "elf")


_KEY = st.from_regex(r"[A-Z][A-Za-z0-9_().\-]{0,30}", fullmatch=True)
_VALUE = st.from_regex(r"[\x20-\x7e]{0,60}", fullmatch=True)


@settings(max_examples=200)
@given(st.lists(st.tuples(_KEY, _VALUE), max_size=40), st.from_regex(r"[\x21-\x7e]{1,64}", fullmatch=True))
def test_parse_copy_round_trip(pairs: list[tuple[str, str]], release: str) -> None:
    text = f"OSRELEASE={release}\nPAGESIZE=4096\n" + "".join(f"{k}={v}\n" for k, v in pairs)
    for form, data in (("note", note_bytes(text)), ("text", text.encode() + b"\0")):
        c = parse_copy(data + bytes(COPY_SPAN), 0, form)
        assert isinstance(c, Candidate) and c.text == text
        assert c.fields["OSRELEASE"] == release
        for k, v in pairs:
            if k not in ("OSRELEASE", "PAGESIZE") and k not in [p[0] for p in pairs[:pairs.index((k, v))]]:
                assert c.fields[k] == v


# --- validate ------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [
    Kernel(),
    Kernel(koff=0, load=0x1000000),                       # no KASLR: phys_base 0
    Kernel(koff=0x3E000000, load=0x2000000),              # phys_base negative
    Kernel(uts_layout="old", release="5.10.0-32-cloud-amd64"),
    Kernel(levels=5),
], ids=["kaslr", "nokaslr", "negative-phys-base", "5.10-uts-layout", "la57"])
def test_validate_accepts_the_running_kernel(kernel: Kernel) -> None:
    img = Image()
    b = boot(img, kernel)
    assert check_live(img, b) == ""
    if kernel.phys_base < 0:
        assert "NUMBER(phys_base)=-" in b.text


def _edit(text: str, key: str, value: str | None) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith(key + "=")]
    if value is not None:
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("key, value, reason", [
    ("SYMBOL(_stext)", None, "SYMBOL(_stext) is missing"),
    ("KERNELOFFSET", None, "KERNELOFFSET is missing"),
    ("NUMBER(phys_base)", None, "NUMBER(phys_base) is missing"),
    ("SYMBOL(init_uts_ns)", None, "SYMBOL(init_uts_ns) is missing"),
    ("NUMBER(phys_base)", "0x100", "not decimal"),
    ("SYMBOL(_stext)", "zz", "not hex"),
    ("PAGESIZE", "8192", "x86-64's 4096"),
    ("KERNELOFFSET", "2a01000", "2 MiB-aligned"),
    ("KERNELOFFSET", "4a00000", "2 MiB-aligned"),     # _stext before the image start
    ("NUMBER(KERNEL_IMAGE_SIZE)", "16777216", "2 MiB-aligned"),  # _stext beyond the image
    ("NUMBER(phys_base)", str(Kernel().phys_base + MiB2), "another kernel's copy"),
    ("SYMBOL(init_uts_ns)", f"{Kernel().stext + 0x200100:x}", "does not hold release"),
    ("SYMBOL(init_top_pgt)", f"{Kernel().stext + 0x20001a0 - 0x1a0:x}", "not mapped"),
    ("OFFSET(uts_namespace.name)", "4", "does not hold release"),
    ("OFFSET(uts_namespace.name)", "99999", "implausible"),
    ("OFFSET(uts_namespace.name)", "-4", "implausible"),
    ("SYMBOL(init_top_pgt)", f"{Kernel().stext + 0x200000:x}", "own page-table root"),
    ("NUMBER(pgtable_l5_enabled)", "1", "own page-table root"),
    ("NUMBER(pgtable_l5_enabled)", "2", "neither 0 nor 1"),
])
def test_validate_rejects(key: str, value: str | None, reason: str) -> None:
    img = Image()
    b = boot(img, Kernel())
    why = check_live(img, b, _edit(b.text, key, value))
    assert reason in why, why


def test_validate_rejects_another_release_with_the_same_layout() -> None:
    """Two kernels without KASLR at the same place: only init_uts_ns tells."""
    img = Image()
    b = boot(img, Kernel(koff=0, load=0x1000000))
    other = b.text.replace("OSRELEASE=6.1.0-57-cloud-amd64", "OSRELEASE=6.1.0-56-cloud-amd64")
    assert "does not hold release '6.1.0-56-cloud-amd64'" in check_live(img, b, other)


def test_validate_survives_unreadable_memory() -> None:
    img = Image()
    b = boot(img, Kernel())

    def failing(addr: int, length: int) -> bytes:
        if length != PAGE_SIZE:  # page tables read fine, init_uts_ns does not
            raise GuestMemoryError("gone", addr)
        return img.read(addr, length)

    why = validate(parse_fields(b.text), translator(img.read, [(b.root, 4)], LIMIT), failing, LIMIT)
    assert "init_uts_ns cannot be read" in why


def test_pa_symbol_wraps_like_the_kernel() -> None:
    assert pa_symbol(START_KERNEL_MAP + 0x1000000, -0x1000000) == 0
    assert pa_symbol(START_KERNEL_MAP, -1) == (1 << 64) - 1


# --- roots and translation -----------------------------------------------------


def test_kernel_roots() -> None:
    cpus = [CPU(0x2A01000 | 0x800, in_kernel=False), CPU(0), CPU(0x2B4C000), CPU(0x2B4C000, 0x1000 | 0x6B0)]
    assert kernel_roots(cpus) == [
        (0x2B4C000, 4), (0x2B4C000, 5),       # kernel-mode vCPUs first
        (0x2A01000, 4),                       # user CR3 under PTI
        (0x2A00000, 4),                       # last, PTI twins: its kernel PGD
    ]
    assert kernel_roots([CPU(0)]) == []


def test_translator_caches_and_falls_back_to_later_roots() -> None:
    img = Image()
    b = boot(img, Kernel())
    empty = PageTables(img, table_base=0x30000000).root
    t = translator(img.read, [(empty, 4), (b.root, 4)], LIMIT)
    assert t(b.kernel.stext + 5) == b.kernel.load + 5
    reads = len(img.reads)
    assert t(b.kernel.stext + 0x100) == b.kernel.load + 0x100
    assert len(img.reads) == reads  # same page: cached
    assert t(0x1000) is None and t(-1) is None and t(1 << 64) is None


# --- select --------------------------------------------------------------------


def cand(gpa: int, form: str, text: str = GOOD) -> Candidate:
    return Candidate(gpa, form, text, parse_fields(text))


CRASHED = GOOD + "CRASHTIME=1700000000\n"


@pytest.mark.parametrize("copies, chosen, twin", [
    ([cand(0x9000, "text"), cand(0x5000, "note")], 0x5000, 0x9000),
    ([cand(0x1000, "note", CRASHED), cand(0x9000, "text"), cand(0x5000, "note")], 0x5000, 0x9000),  # pair wins
    ([cand(0x1000, "text", CRASHED), cand(0x5000, "note")], 0x5000, None),           # note beats text
    ([cand(0x5000, "text"), cand(0x1000, "text", CRASHED)], 0x1000, None),          # lowest address
    ([cand(0x8000, "note"), cand(0x3000, "note"), cand(0x9000, "text"), cand(0x2000, "text")], 0x3000, 0x2000),
    ([cand(0x3000, "note", CRASHED), cand(0x4000, "text", CRASHED), cand(0x1000, "note"), cand(0x2000, "text")],
     0x1000, 0x2000),                                                                 # two pairs: lowest
], ids=["pair", "pair-beats-note", "note-beats-text", "lowest", "several-copies", "two-pairs"])
def test_select(copies: list[Candidate], chosen: int, twin: int | None) -> None:
    c, t, others = select(copies)
    assert (c.gpa, t) == (chosen, twin)
    assert sorted(o.gpa for o in others) == sorted(x.gpa for x in copies if x.gpa not in (chosen, twin))


def test_select_needs_candidates() -> None:
    with pytest.raises(ValueError):
        select([])


# --- the finder on synthetic images ---------------------------------------------

NOTE_AT, TEXT_AT = 0x11EA000, 0x198B000  # where the 6.1 guest keeps them (256 MiB)


def test_finder_finds_linux_pair() -> None:
    img = Image()
    b = boot(img, Kernel())
    put_pair(img, b, NOTE_AT, TEXT_AT)
    f = finder_for(img, b.root)
    img.feed(f)
    r = f.result()
    assert isinstance(r, Found) and f.paired
    assert (r.text, r.gpa, r.form, r.twin_gpa, r.others, r.rejected) == (b.text, NOTE_AT, "note", TEXT_AT, (), ())
    assert f.hits == 2


@pytest.mark.parametrize("form", ["note", "text"])
def test_finder_with_one_form(form: str) -> None:
    img = Image()
    b = boot(img, Kernel())
    img.write(NOTE_AT, note_bytes(b.text) if form == "note" else b.text.encode())
    f = finder_for(img, b.root)
    img.feed(f)
    r = f.result()
    assert isinstance(r, Found) and (r.gpa, r.form, r.twin_gpa) == (NOTE_AT, form, None) and not f.paired


def test_finder_rejects_stale_copies_and_decoys() -> None:
    """The previous boot's pair (other KASLR offsets), an older kernel's
    text, a copy of the same layout with another release, and page-cache
    decoys: only the running kernel's pair is chosen, the rest explained."""
    img = Image()
    old = boot(img, Kernel(koff=0x1C00000, load=0x8000000))      # previous boot, same kernel
    older = boot(img, Kernel(release="5.10.0-32-cloud-amd64", koff=0x3000000, load=0xC000000,
                             uts_layout="old"))
    live = boot(img, Kernel())
    put_pair(img, old, 0x1000000, 0x1800000)
    img.write(0x2000000, older.text.encode())
    img.write(0x2100000, note_bytes(live.text.replace("6.1.0-57", "6.1.0-58")))     # same layout, other release
    img.write(0x2200000, b"OSRELEASE=6.1.0-57-cloud-amd64\n\x7fELF\x02\x01\x01")     # a binary file's page
    img.write(0x2300000, note_bytes(live.text, descsz=len(live.text) + 40))         # desc shorter than n_descsz
    img.write(0x2400000, b"xx" + note_bytes(live.text))                              # not page-aligned
    img.write(0x2500000, _edit(live.text, "KERNELOFFSET", "2a01000").encode())      # tampered
    forged = _edit(live.text, "KERNELOFFSET", "2c00000")  # plausible: only the pair rule tells
    img.write(0x2600000, forged.encode())
    put_pair(img, live, 0x3000000, 0x3100000)
    f = finder_for(img, live.root)
    img.feed(f, order=random.Random(7))
    r = f.result()
    assert isinstance(r, Found)
    assert (r.text, r.gpa, r.twin_gpa) == (live.text, 0x3000000, 0x3100000)
    assert [(o.gpa, o.text) for o in r.others] == [(0x2600000, forged)]
    reasons = {x.gpa: x.reason for x in r.rejected}
    assert set(reasons) == {0x1000000, 0x1800000, 0x2000000, 0x2100000, 0x2200000, 0x2300000, 0x2500000}
    assert "another kernel's copy" in reasons[0x1000000] or "not mapped" in reasons[0x1000000]
    assert "does not hold release" in reasons[0x2100000]
    assert "KEY=VALUE" in reasons[0x2200000]
    assert "shorter than n_descsz" in reasons[0x2300000]
    assert len(f.verdicts) == 6  # each distinct text validated once (old pair's two copies: one)


def test_finder_only_stale_copies() -> None:
    img = Image()
    old = boot(img, Kernel(koff=0x1C00000, load=0x8000000))
    live = boot(img, Kernel())
    put_pair(img, old, 0x1000000, 0x1800000)
    f = finder_for(img, live.root)
    img.feed(f)
    r = f.result()
    assert isinstance(r, NotFound) and len(r.rejected) == 2
    assert r.reason.startswith("2 copies of VMCOREINFO in guest RAM, none is the running kernel's: at 0x1000000:")


def test_finder_none() -> None:
    img = Image()
    live = boot(img, Kernel())
    f = finder_for(img, live.root)
    img.feed(f)
    r = f.result(where="test memory")
    assert isinstance(r, NotFound) and r.reason == "no copy of VMCOREINFO in test memory" and f.hits == 0


def test_finder_note_straddling_a_hole() -> None:
    """A note whose desc runs into a page that holds no data (read as
    zeros) is rejected; a full copy in populated pages is found."""
    img = Image()
    live = boot(img, Kernel())
    big = live.text + "".join(f"SYMBOL(padding_{i:04d})=ffffffff82000000\n" for i in range(120))
    assert PAGE_SIZE < len(big) <= MAX_TEXT
    img.write(0x1000000, note_bytes(big))
    img.hole(0x1001000)
    img.write(0x2000000, note_bytes(big))          # the same, whole, two pages
    img.write(0x3000000, big.encode())             # text form, two pages
    f = finder_for(img, live.root)
    img.feed(f)
    r = f.result()
    assert isinstance(r, Found) and (r.text, r.gpa, r.twin_gpa) == (big, 0x2000000, 0x3000000)
    assert [(x.gpa, "shorter than n_descsz" in x.reason) for x in r.rejected] == [(0x1000000, True)]


def test_finder_text_straddling_a_hole_loses_to_a_note() -> None:
    """A text-form copy cut by a hole at a line boundary looks whole; it
    never wins over the note form, whose n_descsz gives the length."""
    img = Image()
    live = boot(img, Kernel())
    big = live.text + "".join(f"SYMBOL(padding_{i:04d})=ffffffff82000000\n" for i in range(120))
    cut = big.encode()[:PAGE_SIZE]
    cut = cut[:cut.rindex(b"\n") + 1]
    img.write(0x1000000, cut)                      # what a hole after the first page leaves
    img.write(0x2000000, note_bytes(big))
    f = finder_for(img, live.root)
    img.feed(f)
    r = f.result()
    assert isinstance(r, Found) and (r.text, r.gpa) == (big, 0x2000000)
    assert [o.gpa for o in r.others] == [0x1000000]


def test_finder_copy_at_the_end_of_memory() -> None:
    img = Image()
    live = boot(img, Kernel())
    img.write(LIMIT - PAGE_SIZE, note_bytes(live.text))
    f = finder_for(img, live.root)
    img.feed(f)
    r = f.result()
    assert isinstance(r, Found) and r.gpa == LIMIT - PAGE_SIZE


def test_finder_unreadable_copy() -> None:
    img = Image()
    live = boot(img, Kernel())

    def gone(addr: int, length: int) -> bytes:
        raise GuestMemoryError("gone", addr)

    f = Finder(gone, translator(img.read, [(live.root, 4)], LIMIT), LIMIT)
    f.feed(b"OSRELEASE=" + bytes(PAGE_SIZE - 10), 0x5000)
    r = f.result()
    assert isinstance(r, NotFound) and "cannot be read" in r.rejected[0].reason


def test_finder_bounds_what_it_reports() -> None:
    img = Image()
    live = boot(img, Kernel())
    for i in range(40):
        img.write(0x1000000 + i * PAGE_SIZE, b"OSRELEASE=junk\n\x01")
    f = finder_for(img, live.root)
    img.feed(f)
    r = f.result()
    assert isinstance(r, NotFound) and len(r.rejected) == 32 and r.reason.startswith("40 copies")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_finder_random_layouts(data: st.DataObject) -> None:
    """Random places for the live pair, stale pairs of other boots, decoy
    copies of the live text (page cache) and junk: the live text is found,
    at a note holding it, whatever the order memory is fed in."""
    img = Image()
    live = boot(img, Kernel())
    stale = [boot(img, Kernel(koff=koff, load=load)) for koff, load in
             [(0x1C00000, 0x8000000), (0x3000000, 0xC000000)][:data.draw(st.integers(0, 2))]]
    slots = data.draw(st.lists(st.integers(0x400, 0x1FFF), min_size=12, max_size=12, unique=True))
    pages = [s * PAGE_SIZE + 0x10000000 for s in slots]
    put_pair(img, live, pages[0], pages[1])
    used = 2
    for s in stale:
        put_pair(img, s, pages[used], pages[used + 1])
        used += 2
    for _ in range(data.draw(st.integers(0, 3))):
        img.write(pages[used], live.text.encode() if data.draw(st.booleans()) else note_bytes(live.text))
        used += 1
    for _ in range(data.draw(st.integers(0, 3))):
        img.write(pages[used], b"OSRELEASE=" + data.draw(st.binary(max_size=64)))
        used += 1
    f = finder_for(img, live.root)
    img.feed(f, chunk=data.draw(st.sampled_from([PAGE_SIZE, 16 * PAGE_SIZE, 1 << 20])),
             order=random.Random(data.draw(st.integers(0, 1000))))
    r = f.result()
    assert isinstance(r, Found) and r.text == live.text and r.form == "note"
    assert img.read(r.gpa, 24) == note_bytes(live.text)[:24]
    assert r.twin_gpa is not None and img.read(r.twin_gpa, len(live.text)) == live.text.encode()
    assert all(x.gpa in pages[2:used] for x in r.rejected)


def test_result_keeps_stats() -> None:
    img = Image()
    live = boot(img, Kernel())
    f = finder_for(img, live.root)
    stats = ScanStats(bytes_read=4096, complete=False, stopped="bound")
    r = f.result(stats)
    assert isinstance(r, NotFound) and r.stats == stats and r.reason.endswith("; the scan stopped early: bound")
    assert replace(r, reason="x").stats is stats
