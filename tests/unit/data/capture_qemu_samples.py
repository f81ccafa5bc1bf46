"""Regenerate the QEMU samples in this folder (not a test; run by hand).

For each machine below this starts ``qemu-system-x86_64`` paused at reset
(a bare :class:`vmcorefs.testing.GuestSpec`: the test guests' command line
without a kernel, ``-S``; ``pc-seabios`` lets the firmware run first), asks
``info mtree -f`` and ``gpa2hva`` for every
range through QMP, runs QEMU's own ``dump-guest-memory
paging=false`` into a temporary file and keeps only the (p_paddr, p_memsz)
of its PT_LOADs, and copies the ``/proc/PID/maps`` lines that hold the
recorded host addresses.  Outputs, per machine NAME:

* ``mtree-NAME.txt``   the verbatim ``info mtree -f`` text;
* ``mtree-NAME.json``  QEMU version and command line, gpa2hva answers
  (verbatim, keyed by the queried address), the dump's ELF class/machine
  and PT_LOAD list, and the maps lines.

It also keeps a 1-byte ``dump-guest-memory`` of machine ``pc-memfd`` as
``qemu72-reset-em386-onebyte-dump.elf``: taken at reset (CPU not in long
mode), so QEMU writes e_machine EM_386 and 32-bit NT_PRSTATUS notes, in an
ELF64 file because pc.bios ends at 4 GiB.

Usage: ``.venv/bin/python tests/unit/data/capture_qemu_samples.py`` (needs
qemu-system-x86_64 and ~6 GiB free in $TMPDIR for the 5 GiB dump).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from elftools.elf.elffile import ELFFile

from vmcorefs.testing import GuestSpec, QemuGuest

HERE = Path(__file__).resolve().parent


def bare(name: str, vcpus: int = 1, extra: tuple[str, ...] = (), **kw: Any) -> GuestSpec:
    """A machine without a guest, stopped at reset."""
    return GuestSpec(name, bare=True, vmcoreinfo=False, vcpus=vcpus, extra=("-S", *extra), **kw)


#: name -> (machine, QMP commands after start, seconds to run, QMP commands after that)
MACHINES: dict[str, tuple[GuestSpec, list[list[Any]], float, list[list[Any]]]] = {
    "pc-memfd": (bare("pc-memfd", memory="memfd", mib=256), [], 0, []),
    "pc-5g": (bare("pc-5g", memory="private", mib=5 << 10), [], 0, []),
    "q35-numa": (bare("q35-numa", machine="q35", memory="none", vcpus=2, extra=(
        "-m", "4G", "-object", "memory-backend-ram,id=m0,size=2G", "-object", "memory-backend-ram,id=m1,size=2G",
        "-numa", "node,memdev=m0", "-numa", "node,memdev=m1")), [], 0, []),
    "pc-dimm": (bare("pc-dimm", memory="none", extra=("-m", "1G,slots=2,maxmem=4G")), [
        ["object-add", {"qom-type": "memory-backend-ram", "id": "dimm0mem", "size": 268435456}],
        ["device_add", {"driver": "pc-dimm", "id": "dimm0", "memdev": "dimm0mem"}],
    ], 0, []),
    # SeaBIOS runs for a few seconds (no boot device) and programs the PAM
    # registers: 0xc0000-0xfffff then map pc.ram read-only/read-write in
    # pieces, which QEMU's dump joins with the pc.ram above 1 MiB.
    "pc-seabios": (GuestSpec("pc-seabios", bare=True, vmcoreinfo=False, vcpus=1, memory="private", mib=256),
                   [["cont", None]], 3, [["stop", None]]),
}

_RANGE = re.compile(r"^\s*([0-9a-f]{16})-([0-9a-f]{16}) \(prio -?\d+, (\S+)\): ")


def memory_view_ranges(text: str) -> list[tuple[int, int, str]]:
    """(start, last, type) of the FlatView that serves AS "memory" (rough)."""
    out: list[tuple[int, int, str]] = []
    names: list[str] = []
    collecting = False
    for line in text.splitlines():
        if line.startswith("FlatView #"):
            if out:
                break
            names, collecting = [], False
        elif line.strip().startswith("AS "):
            names.append(line.split('"')[1])
        elif line.strip().startswith("Root memory region"):
            collecting = "memory" in names
        elif collecting and (m := _RANGE.match(line)):
            out.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3).rstrip(")")))
    return out


def maps_lines(pid: int, hvas: list[int]) -> list[str]:
    keep = []
    with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if any(start <= h < end for h in hvas):
                keep.append(line.rstrip("\n"))
    return keep


def capture(name: str) -> None:
    spec, qmp_before, run_seconds, qmp_after = MACHINES[name]
    with QemuGuest(spec) as g:
        version = g.qmp("query-version")["qemu"]
        for cmd, args in qmp_before:
            g.qmp(cmd, **(args or {}))
        time.sleep(run_seconds)
        for cmd, args in qmp_after:
            g.qmp(cmd, **(args or {}))

        mtree = g.hmp("info mtree -f")
        # Every range (i/o ones answer "... is not RAM"), and the first
        # unmapped address ("No memory is mapped at address ...").
        gpa2hva: dict[str, str] = {}
        ranges = memory_view_ranges(mtree)
        probes = [start for start, _last, _typ in ranges]
        probes += [last + 1 for (_s, last, _t), (nxt, _l, _u) in zip(ranges, ranges[1:])
                   if nxt != last + 1][:1]
        for gpa in probes:
            gpa2hva[f"{gpa:#x}"] = g.hmp(f"gpa2hva {gpa:#x}")
        hvas = [int(m.group(1), 16) for a in gpa2hva.values()
                if (m := re.search(r" is 0x([0-9a-f]+)", a))]

        dump = g.dir / f"{name}.elf"
        g.dump(dump)
        with open(dump, "rb") as f:
            elf = ELFFile(f)
            loads = [[seg["p_paddr"], seg["p_memsz"]] for seg in elf.iter_segments()
                     if seg["p_type"] == "PT_LOAD"]
            elfclass, machine = elf.elfclass, elf["e_machine"]
        dump.unlink()

        if name == "pc-memfd":
            g.qmp("dump-guest-memory", paging=False, protocol=f"file:{dump}", begin=loads[0][0], length=1)
            shutil.copyfile(dump, HERE / "qemu72-reset-em386-onebyte-dump.elf")
            dump.unlink()

        record = {
            "qemu_version": f"{version['major']}.{version['minor']}.{version['micro']}",
            "argv": [a.replace(str(g.dir), "TMP") for a in g.args],
            "qmp": qmp_before + qmp_after,
            "run_seconds": run_seconds,
            "gpa2hva": gpa2hva,
            "dump_elfclass": elfclass,
            "dump_e_machine": machine,
            "dump_loads": loads,
            "maps": maps_lines(g.pid, hvas),
        }
        (HERE / f"mtree-{name}.txt").write_text(mtree)
        (HERE / f"mtree-{name}.json").write_text(json.dumps(record, indent=1) + "\n")


def main(names: list[str]) -> None:
    for name in names or list(MACHINES):
        print(f"capturing {name}", file=sys.stderr)
        capture(name)


if __name__ == "__main__":
    os.umask(0o022)
    main(sys.argv[1:])
