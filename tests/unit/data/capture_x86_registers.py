"""Capture ``info registers -a`` with QEMU's own notes (not a test; run by hand).

For each scene below this starts a QEMU (``--qemu``, default
``qemu-system-x86_64`` on PATH), pauses the guest, and keeps, under the
prefix ``qemuVV-x86-SCENE`` (VV = major and minor version):

* ``.registers.txt``        the verbatim ``info registers -a`` text;
* ``-onebyte-dump.elf``     QEMU's ``dump-guest-memory paging=false`` of one
                            byte (begin = 0, the first RAM byte) taken right
                            after, with the guest still paused: the ELF
                            header, program headers and QEMU's PT_NOTE;
* ``.json``                 QEMU version, command line, CPL of each vCPU.

Scenes:

``busy``   the test guest (6.1 kernel, busybox, 2 vCPUs, TCG) with a shell
           busy loop started on its console, paused until one vCPU is in
           user mode (CPL 3) and one in the kernel (up to 200 tries);
``reset``  2 vCPUs at reset (``-S``, no guest): real mode, so QEMU writes
           the i386 prstatus (EM_386) notes.

Usage: ``.venv/bin/python tests/unit/data/capture_x86_registers.py
[--qemu PATH] [-L DIR] [SCENE...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("VMCOREFS_CACHE", "/var/cache/vmcorefs"))
GUEST = CACHE / "guest"
BASE = ["-accel", "tcg", "-cpu", "qemu64", "-smp", "2", "-display", "none", "-vga", "none",
        "-nodefaults", "-no-reboot", "-M", "pc", "-m", "256M"]


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


async def capture(qemu: str, extra: list[str], scene: str, tmp: Path) -> None:
    qmp_path, ser_path, ser_log = tmp / f"{scene}.qmp", tmp / f"{scene}.ser", tmp / f"{scene}.log"
    args = [qemu, *extra, *BASE]
    if scene == "busy":
        args += ["-kernel", str(GUEST / "vmlinuz"), "-initrd", str(GUEST / "initramfs.cpio.gz"),
                 "-append", "console=ttyS0 panic=-1", "-device", "vmcoreinfo",
                 "-chardev", f"socket,id=ser0,path={ser_path},server=on,wait=off,logfile={ser_log}",
                 "-serial", "chardev:ser0"]
    elif scene == "reset":
        args += ["-S"]
    else:
        raise SystemExit(f"unknown scene {scene}")
    argv = [*args, "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    console = None
    try:
        wait_for(qmp_path.exists, 10, "QMP socket")
        qmp = QMPClient(scene)
        await qmp.connect(str(qmp_path))
        v: Any = (await qmp.execute("query-version"))["qemu"]
        version = f"{v['major']}.{v['minor']}.{v['micro']}"

        async def hmp(line: str) -> str:
            return str(await qmp.execute("human-monitor-command", {"command-line": line}))

        if scene == "busy":
            console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            wait_for(ser_path.exists, 10, "serial socket")
            console.connect(str(ser_path))
            # Drain the console: QEMU's serial port stalls the guest once
            # the socket buffer is full (the log file keeps the text).
            threading.Thread(target=drain, args=(console,), daemon=True).start()
            wait_for(lambda: ser_log.exists() and b"VMCOREFS-GUEST-READY" in ser_log.read_bytes(),
                     120, "guest boot")
            console.sendall(b"while :; do :; done &\n")
            await asyncio.sleep(2)
            for _ in range(200):
                await qmp.execute("stop")
                text = await hmp("info registers -a")
                cpls = [int(c) for c in re.findall(r" CPL=(\d)", text)]
                if 3 in cpls and 0 in cpls:
                    break
                await qmp.execute("cont")
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("no vCPU caught in user mode")
        else:
            text = await hmp("info registers -a")
            cpls = [int(c) for c in re.findall(r" CPL=(\d)", text)]
        dump = tmp / f"{scene}.elf"
        await qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump}",
                                                "begin": 0, "length": 1})
        prefix = f"qemu{v['major']}{v['minor']}-x86-{scene}"
        (HERE / f"{prefix}.registers.txt").write_text(text)
        (HERE / f"{prefix}-onebyte-dump.elf").write_bytes(dump.read_bytes())
        argv_shown = [Path(args[0]).name, *(a.replace(str(tmp), "TMP") for a in args[1:])]
        record = {"qemu_version": version, "argv": argv_shown, "cpl": cpls}
        (HERE / f"{prefix}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{prefix}: QEMU {version}, CPL {cpls}", file=sys.stderr)
        await qmp.execute("quit")
        try:
            await qmp.disconnect()
        except EOFError:
            pass
        proc.wait(timeout=10)
    finally:
        if console is not None:
            console.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("-L", dest="datadir", help="QEMU's firmware directory (-L)")
    ap.add_argument("scenes", nargs="*", default=["busy", "reset"])
    opts = ap.parse_args()
    extra = ["-L", opts.datadir] if opts.datadir else []
    with tempfile.TemporaryDirectory(prefix="vmcorefs-capture-") as d:
        for scene in opts.scenes:
            await capture(opts.qemu, extra, scene, Path(d))


if __name__ == "__main__":
    os.umask(0o022)
    asyncio.run(main())
