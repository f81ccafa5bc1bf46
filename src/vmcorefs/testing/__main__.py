"""``python -m vmcorefs.testing``: the test harness for shell scripts (``scripts/demo.sh``).

    boot DIR [--memory memfd|private] [--mib N] [--vcpus N] [--kernel DIR] [--qemu 7.2|10]
        Boot a test guest whose sockets and logs are in DIR (qmp.sock for
        vmcorefs, own-qmp.sock, serial.log, qemu.log, qemu.pid), wait until
        it is up, print its ready line and exit 0, leaving QEMU running: kill
        the PID in DIR/qemu.pid when done.  Exit 1 (QEMU killed) if it does
        not come up.  --qemu 10 runs bookworm-backports' QEMU 10 that
        scripts/build-tools.sh unpacks under /var/cache/vmcorefs/qemu-10
        (default 7.2, Debian 12's); the 6.12 kernel needs it under TCG:
        boot DIR --qemu 10 --kernel /var/cache/vmcorefs/guest-backports
    drgn-kallsyms CORE [SYMBOL...]
        drgn without debuginfo on CORE: prints linux_banner, then each
        SYMBOL's first 8 bytes as an integer.
    printk-head MNT
        The guest's printk ring head id, read from MNT/pmem (it moves with
        every kernel message).
    libvirtd-start STATE
        Start virtlogd and libvirtd (without systemd) unless qemu:///system
        answers; the pid files of what was started go to STATE.
    libvirtd-stop STATE
        Stop the daemons that libvirtd-start listed in STATE.
    libvirt-boot NAME [--memory private|memfd] [--mib N] [--vmcoreinfo]
        Start transient TCG domain NAME of the test kernel (2 vCPUs), wait
        until it is up and print its directory (kernel, serial log).
    libvirt-destroy NAME DIR
        Destroy domain NAME and remove its directory DIR.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vmcorefs.testing.guests import (
    DEBIAN12,
    QEMU10,
    READY,
    SYSTEM_QEMU,
    GuestSpec,
    KernelAssets,
    Qemu,
    QemuGuest,
    Unavailable,
)
from vmcorefs.testing.probes import DRGN_KALLSYMS, printk_head_id, vmcoreinfo_dict


#: ``boot --qemu``: the QEMUs the test guests run on.
QEMUS: dict[str, Qemu] = {"7.2": SYSTEM_QEMU, "10": QEMU10}


def boot(a: argparse.Namespace) -> int:
    spec = GuestSpec(a.dir.name, qemu=QEMUS[a.qemu], memory=a.memory, mib=a.mib, vcpus=a.vcpus,
                     kernel=KernelAssets(a.kernel))
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


def libvirt(a: argparse.Namespace) -> int:
    from vmcorefs.testing import libvirt as lv

    try:
        if a.command == "libvirtd-start":
            a.state.write_text("".join(f"{p}\n" for p in lv.start_libvirtd()))
        elif a.command == "libvirtd-stop":
            lv.stop_libvirtd(a.state.read_text().split() if a.state.exists() else [])
        elif a.command == "libvirt-boot":
            print(lv.boot_domain(a.name, a.memory, a.vmcoreinfo, a.mib).dir)
        else:
            lv.destroy(lv.Domain(a.name, "", a.dir, ""))
    except (lv.LibvirtUnavailable, AssertionError, TimeoutError, OSError) as e:
        print(f"vmcorefs.testing: {e}", file=sys.stderr)
        return 1
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
    b.add_argument("--qemu", choices=list(QEMUS), default="7.2",
                   help=f"Debian 12's QEMU 7.2 (default) or QEMU 10 ({QEMU10.binary}), which the 6.12"
                        " kernel needs")
    d = sub.add_parser("drgn-kallsyms", help="drgn without debuginfo: linux_banner and symbol values")
    d.add_argument("core")
    d.add_argument("symbols", nargs="*")
    h = sub.add_parser("printk-head", help="the printk ring head id from MNT/pmem")
    h.add_argument("mnt", type=Path)
    for command in ("libvirtd-start", "libvirtd-stop"):
        sub.add_parser(command, help="start libvirtd if needed" if command.endswith("start")
                       else "stop what libvirtd-start started").add_argument("state", type=Path)
    lb = sub.add_parser("libvirt-boot", help="boot a transient libvirt domain of the test kernel")
    lb.add_argument("name")
    lb.add_argument("--memory", choices=["memfd", "private"], default="private")
    lb.add_argument("--mib", type=int, default=256)
    lb.add_argument("--vmcoreinfo", action="store_true", help="<features><vmcoreinfo state='on'/>")
    ld = sub.add_parser("libvirt-destroy", help="destroy a domain of libvirt-boot")
    ld.add_argument("name")
    ld.add_argument("dir", type=Path)
    a = p.parse_args(argv)
    if a.command == "boot":
        return boot(a)
    if a.command.startswith("libvirt"):
        return libvirt(a)
    if a.command == "drgn-kallsyms":
        os.execv(sys.executable, [sys.executable, "-c", DRGN_KALLSYMS, a.core, *a.symbols])
    vci = vmcoreinfo_dict((a.mnt / "vmcoreinfo").read_text())
    print(printk_head_id(a.mnt / "pmem", vci))
    return 0


if __name__ == "__main__":
    sys.exit(main())
