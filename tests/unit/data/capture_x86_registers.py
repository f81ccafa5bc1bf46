"""Capture ``info registers -a`` with QEMU's own notes (not a test; run by hand).

For each scene below this starts a QEMU (``--qemu``, default
``qemu-system-x86_64`` on PATH) through :mod:`vmcorefs.testing` (the test
guests' command line), pauses the guest, and keeps, under the
prefix ``qemuVV-x86-SCENE`` (VV = major and minor version):

* ``.registers.txt``        the verbatim ``info registers -a`` text;
* ``-onebyte-dump.elf``     QEMU's ``dump-guest-memory paging=false`` of one
                            byte (begin = 0, the first RAM byte) taken right
                            after, with the guest still paused: the ELF
                            header, program headers and QEMU's PT_NOTE;
* ``.json``                 QEMU version, command line, CPL of each vCPU.

Scenes:

``busy``   the test guest (6.1 kernel, busybox, 2 vCPUs, TCG, private RAM)
           with a shell busy loop started on its console, paused until one
           vCPU is in user mode (CPL 3) and one in the kernel (up to 200
           tries);
``reset``  2 vCPUs at reset (a bare machine, ``-S``): real mode, so QEMU
           writes the i386 prstatus (EM_386) notes.

Usage: ``.venv/bin/python tests/unit/data/capture_x86_registers.py
[--qemu PATH] [-L DIR] [SCENE...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from vmcorefs.testing import BUSY_LOOP, GuestSpec, Qemu, QemuGuest, pause_with_a_user_vcpu

HERE = Path(__file__).resolve().parent
SCENES = {
    "busy": GuestSpec("capture-busy", memory="private", console=True),
    "reset": GuestSpec("capture-reset", memory="private", vmcoreinfo=False, bare=True, extra=("-S",)),
}


def capture(qemu: Qemu, scene: str) -> None:
    spec = SCENES.get(scene)
    if spec is None:
        raise SystemExit(f"unknown scene {scene}")
    with QemuGuest(replace(spec, qemu=qemu)) as g:
        v: Any = g.qmp("query-version")["qemu"]
        version = f"{v['major']}.{v['minor']}.{v['micro']}"
        if scene == "busy":
            g.send_console(BUSY_LOOP)
            time.sleep(2)
            text = pause_with_a_user_vcpu(g, tries=200)
        else:
            text = g.hmp("info registers -a")
        cpls = [int(c) for c in re.findall(r" CPL=(\d)", text)]
        dump = g.dir / f"{scene}.elf"
        g.qmp("dump-guest-memory", paging=False, protocol=f"file:{dump}", begin=0, length=1)
        prefix = f"qemu{v['major']}{v['minor']}-x86-{scene}"
        (HERE / f"{prefix}.registers.txt").write_text(text)
        (HERE / f"{prefix}-onebyte-dump.elf").write_bytes(dump.read_bytes())
        argv_shown = [Path(g.args[0]).name, *(a.replace(str(g.dir), "TMP") for a in g.args[1:])]
        record = {"qemu_version": version, "argv": argv_shown, "cpl": cpls}
        (HERE / f"{prefix}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{prefix}: QEMU {version}, CPL {cpls}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("-L", dest="datadir", help="QEMU's firmware directory (-L)")
    ap.add_argument("scenes", nargs="*", default=list(SCENES))
    opts = ap.parse_args()
    qemu = Qemu(opts.qemu, Path(opts.datadir) if opts.datadir else None)
    for scene in opts.scenes:
        capture(qemu, scene)


if __name__ == "__main__":
    os.umask(0o022)
    main()
