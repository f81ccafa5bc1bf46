"""Regenerate the QEMU samples in this folder (not a test; run by hand).

For each machine below this starts ``qemu-system-x86_64`` paused at reset
(``-S``, TCG, no guest; ``pc-seabios`` lets the firmware run first), asks ``info mtree -f`` and ``gpa2hva`` for every
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

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from elftools.elf.elffile import ELFFile
from qemu.qmp import QMPClient

HERE = Path(__file__).resolve().parent
QEMU = "qemu-system-x86_64"
BASE = ["-accel", "tcg", "-cpu", "qemu64", "-display", "none", "-nodefaults", "-S"]

MACHINES: dict[str, dict[str, Any]] = {
    "pc-memfd": {
        "args": ["-M", "pc", "-m", "256M",
                 "-object", "memory-backend-memfd,id=mem0,size=256M,share=on",
                 "-machine", "memory-backend=mem0"],
    },
    "pc-5g": {"args": ["-M", "pc", "-m", "5G"]},
    "q35-numa": {
        "args": ["-M", "q35", "-m", "4G", "-smp", "2",
                 "-object", "memory-backend-ram,id=m0,size=2G",
                 "-object", "memory-backend-ram,id=m1,size=2G",
                 "-numa", "node,memdev=m0", "-numa", "node,memdev=m1"],
    },
    "pc-dimm": {
        "args": ["-M", "pc", "-m", "1G,slots=2,maxmem=4G"],
        "qmp": [
            ["object-add", {"qom-type": "memory-backend-ram", "id": "dimm0mem", "size": 268435456}],
            ["device_add", {"driver": "pc-dimm", "id": "dimm0", "memdev": "dimm0mem"}],
        ],
    },
    # SeaBIOS runs for a few seconds (no boot device) and programs the PAM
    # registers: 0xc0000-0xfffff then map pc.ram read-only/read-write in
    # pieces, which QEMU's dump joins with the pc.ram above 1 MiB.
    "pc-seabios": {
        "args": ["-M", "pc", "-m", "256M"],
        "qmp": [["cont", None]],
        "run_seconds": 3,
        "qmp_after": [["stop", None]],
    },
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


async def capture(name: str, spec: dict[str, Any], tmp: Path) -> None:
    sock = tmp / f"{name}.sock"
    argv = [QEMU, *BASE, *spec["args"], "-qmp", f"unix:{sock},server=on,wait=off"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        qmp = QMPClient(name)
        await qmp.connect(str(sock))
        version: Any = await qmp.execute("query-version")
        version = version["qemu"]
        for cmd, args in spec.get("qmp", []):
            await qmp.execute(cmd, args)
        await asyncio.sleep(spec.get("run_seconds", 0))
        for cmd, args in spec.get("qmp_after", []):
            await qmp.execute(cmd, args)

        async def hmp(line: str) -> str:
            return str(await qmp.execute("human-monitor-command", {"command-line": line}))

        mtree = await hmp("info mtree -f")
        # Every range (i/o ones answer "... is not RAM"), and the first
        # unmapped address ("No memory is mapped at address ...").
        gpa2hva: dict[str, str] = {}
        ranges = memory_view_ranges(mtree)
        probes = [start for start, _last, _typ in ranges]
        probes += [last + 1 for (_s, last, _t), (nxt, _l, _u) in zip(ranges, ranges[1:])
                   if nxt != last + 1][:1]
        for gpa in probes:
            gpa2hva[f"{gpa:#x}"] = await hmp(f"gpa2hva {gpa:#x}")
        hvas = [int(m.group(1), 16) for a in gpa2hva.values()
                if (m := re.search(r" is 0x([0-9a-f]+)", a))]

        dump = tmp / f"{name}.elf"
        await qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump}"})
        with open(dump, "rb") as f:
            elf = ELFFile(f)
            loads = [[seg["p_paddr"], seg["p_memsz"]] for seg in elf.iter_segments()
                     if seg["p_type"] == "PT_LOAD"]
            elfclass, machine = elf.elfclass, elf["e_machine"]
        dump.unlink()

        if name == "pc-memfd":
            await qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump}",
                                                    "begin": loads[0][0], "length": 1})
            shutil.copyfile(dump, HERE / "qemu72-reset-em386-onebyte-dump.elf")
            dump.unlink()

        record = {
            "qemu_version": f"{version['major']}.{version['minor']}.{version['micro']}",
            "argv": [a for a in argv[:-2]],
            "qmp": spec.get("qmp", []) + spec.get("qmp_after", []),
            "run_seconds": spec.get("run_seconds", 0),
            "gpa2hva": gpa2hva,
            "dump_elfclass": elfclass,
            "dump_e_machine": machine,
            "dump_loads": loads,
            "maps": maps_lines(proc.pid, hvas),
        }
        (HERE / f"mtree-{name}.txt").write_text(mtree)
        (HERE / f"mtree-{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        await qmp.execute("quit")
        try:
            await qmp.disconnect()
        except EOFError:
            pass  # QEMU closed the socket first
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def main(names: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="vmcorefs-capture-") as d:
        for name in names or list(MACHINES):
            print(f"capturing {name}", file=sys.stderr)
            await capture(name, MACHINES[name], Path(d))


if __name__ == "__main__":
    os.umask(0o022)
    asyncio.run(main(sys.argv[1:]))
