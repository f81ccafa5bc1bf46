"""``python -m vmcorefs.testing``: the test harness for shell scripts (``scripts/demo.sh``).

    boot DIR [--memory memfd|private] [--mib N] [--vcpus N] [--kernel DIR]
        Boot a test guest whose sockets and logs are in DIR (qmp.sock for
        vmcorefs, own-qmp.sock, serial.log, qemu.log, qemu.pid), wait until
        it is up, print its ready line and exit 0, leaving QEMU running: kill
        the PID in DIR/qemu.pid when done.  Exit 1 (QEMU killed) if it does
        not come up.
    drgn-kallsyms CORE [SYMBOL...]
        drgn without debuginfo on CORE: prints linux_banner, then each
        SYMBOL's first 8 bytes as an integer.
    printk-head MNT
        The guest's printk ring head id, read from MNT/pmem (it moves with
        every kernel message).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vmcorefs.testing.guests import DEBIAN12, READY, GuestSpec, KernelAssets, QemuGuest, Unavailable
from vmcorefs.testing.probes import DRGN_KALLSYMS, printk_head_id, vmcoreinfo_dict


def boot(a: argparse.Namespace) -> int:
    spec = GuestSpec(a.dir.name, memory=a.memory, mib=a.mib, vcpus=a.vcpus, kernel=KernelAssets(a.kernel))
    a.dir.mkdir(parents=True, exist_ok=True)
    try:
        g = QemuGuest(spec, directory=a.dir, detach=True)
    except Unavailable as e:
        print(f"vmcorefs.testing: {e}", file=sys.stderr)
        return 1
    try:
        g.wait_ready()
    except (RuntimeError, TimeoutError, KeyboardInterrupt) as e:
        g.close()
        print(f"vmcorefs.testing: {e}", file=sys.stderr)
        return 1
    line = next(x for x in g.serial.read_bytes().splitlines() if READY in x)
    print(line.decode(errors="replace").strip())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmcorefs.testing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("boot", help="boot a test guest and leave it running")
    b.add_argument("dir", type=Path)
    b.add_argument("--memory", choices=["memfd", "private"], default="memfd")
    b.add_argument("--mib", type=int, default=512, help="guest RAM in MiB (default 512)")
    b.add_argument("--vcpus", type=int, default=2)
    b.add_argument("--kernel", type=Path, default=DEBIAN12.dir, help=f"kernel assets (default {DEBIAN12.dir})")
    d = sub.add_parser("drgn-kallsyms", help="drgn without debuginfo: linux_banner and symbol values")
    d.add_argument("core")
    d.add_argument("symbols", nargs="*")
    h = sub.add_parser("printk-head", help="the printk ring head id from MNT/pmem")
    h.add_argument("mnt", type=Path)
    a = p.parse_args(argv)
    if a.command == "boot":
        return boot(a)
    if a.command == "drgn-kallsyms":
        os.execv(sys.executable, [sys.executable, "-c", DRGN_KALLSYMS, a.core, *a.symbols])
    vci = vmcoreinfo_dict((a.mnt / "vmcoreinfo").read_text())
    print(printk_head_id(a.mnt / "pmem", vci))
    return 0


if __name__ == "__main__":
    sys.exit(main())
