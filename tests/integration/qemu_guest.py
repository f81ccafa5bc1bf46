"""Real QEMU guests and real FUSE mounts for the integration tests.

A :class:`QemuGuest` is a TCG guest running Debian's cloud kernel with the
busybox initramfs from ``scripts/build-guest.sh`` and ``-device vmcoreinfo``.
It has two QMP sockets: ``qmp`` for vmcorefs, ``test_qmp`` for the test's
own commands (QMP serves one client per monitor).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from qemu.qmp.legacy import QEMUMonitorProtocol

CACHE = Path(os.environ.get("VMCOREFS_CACHE", "/var/cache/vmcorefs"))
GUEST_DIR = CACHE / "guest"
REPO = Path(__file__).resolve().parents[2]
VMCOREFS = [sys.executable, "-m", "vmcorefs"]
BOOT_TIMEOUT = 60.0


def require(ok: bool, why: str) -> None:
    """Skip when a dependency is missing -- but fail under CI=true."""
    if ok:
        return
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"missing dependency in CI: {why}")
    pytest.skip(why)


OLD_GUEST_DIR = CACHE / "guest-bullseye"


def guest_assets(guest_dir: Path = GUEST_DIR) -> tuple[Path, Path, str]:
    kernel, initrd, release = guest_dir / "vmlinuz", guest_dir / "initramfs.cpio.gz", guest_dir / "release"
    require(kernel.exists() and initrd.exists(), f"guest not built ({guest_dir}); run scripts/setup.sh")
    require(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed")
    return kernel, initrd, release.read_text().strip()


class QemuGuest:
    def __init__(self, name: str, mem_mb: int = 256, smp: int = 2, memory: str = "memfd",
                 extra: list[str] | None = None, vmcoreinfo: bool = True, reboot: bool = False,
                 guest_dir: Path = GUEST_DIR) -> None:
        kernel, initrd, self.release = guest_assets(guest_dir)
        self.guest_dir = guest_dir
        self.dir = Path(tempfile.mkdtemp(prefix=f"vmcorefs-{name}-"))
        self.qmp_path = str(self.dir / "qmp.sock")
        self.test_qmp_path = str(self.dir / "test-qmp.sock")
        self.serial = self.dir / "serial.log"
        self.mem_mb = mem_mb
        args = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64", "-smp", str(smp),
            "-display", "none", "-vga", "none", "-nodefaults", *([] if reboot else ["-no-reboot"]),
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 printk.devkmsg=on",
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.test_qmp_path},server=on,wait=off",
        ]
        if vmcoreinfo:
            args += ["-device", "vmcoreinfo"]
        if memory == "memfd":
            args += ["-m", f"{mem_mb}M", "-object", f"memory-backend-memfd,id=mem0,size={mem_mb}M,share=on",
                     "-machine", "pc,memory-backend=mem0"]
        elif memory == "private":
            args += ["-m", f"{mem_mb}M", "-machine", "pc"]
        elif memory != "none":  # "none": the caller's extra arguments say it all
            raise ValueError(memory)
        args += extra or []
        self.args = args
        self.log = open(self.dir / "qemu.log", "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self._qmp: QEMUMonitorProtocol | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> "QemuGuest":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {(self.dir / 'qemu.log').read_text()}")
            if self.serial.exists() and b"VMCOREFS-GUEST-READY" in self.serial.read_bytes():
                return self
            time.sleep(0.1)
        raise TimeoutError(f"guest did not boot in {timeout} s; serial: {self.serial.read_text()[-2000:]}")

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command on the test's own monitor."""
        if self._qmp is None:
            self._qmp = QEMUMonitorProtocol(self.test_qmp_path)
            self._qmp.connect()
        return self._qmp.cmd(command, **arguments)

    def release_qmp(self) -> None:
        """Disconnect the test's QMP client (reconnects on next use)."""
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
            time.sleep(0.2)

    def hmp(self, line: str) -> str:
        return str(self.qmp("human-monitor-command", **{"command-line": line}))

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        was_running = self.status() == "running"
        self.qmp("stop")
        try:
            yield
        finally:
            if was_running:
                self.qmp("cont")

    def dump(self, path: Path) -> Path:
        """QEMU's own dump-guest-memory (paging=false): the oracle."""
        self.qmp("dump-guest-memory", paging=False, protocol=f"file:{path}")
        return path

    def close(self) -> None:
        self.release_qmp()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def is_mounted(path: str | Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def unmount(path: str | Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)


class Mount:
    """``vmcorefs mount`` (daemon mode) of a guest on a fresh directory."""

    def __init__(self, guest: QemuGuest, *options: str, socket: str | None = None) -> None:
        self.guest = guest
        self.path = Path(tempfile.mkdtemp(prefix="vmcorefs-mnt-"))
        self.options = options
        self.socket = socket or guest.qmp_path

    def __enter__(self) -> "Mount":
        r = run_vmcorefs("mount", *self.options, self.socket, str(self.path))
        if r.returncode != 0:
            raise RuntimeError(f"vmcorefs mount failed ({r.returncode}): {r.stderr}")
        assert is_mounted(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["fusermount3", "-u", str(self.path)], check=False, capture_output=True)
        deadline = time.monotonic() + 10
        while is_mounted(self.path) and time.monotonic() < deadline:
            time.sleep(0.05)
        unmount(self.path)
        # Wait for the daemon to release the QMP monitor (one client at a time).
        time.sleep(0.2)
        with contextlib.suppress(OSError):
            self.path.rmdir()

    @property
    def vmcore(self) -> Path:
        return self.path / "vmcore"

    @property
    def pmem(self) -> Path:
        return self.path / "pmem"


def run_vmcorefs(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([*VMCOREFS, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def vmcoreinfo_dict(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


START_KERNEL_MAP = 0xFFFFFFFF80000000


def kernel_image_phys(vmcoreinfo: dict[str, str], symbol: str) -> int:
    """Guest-physical address of a kernel-image symbol named in VMCOREINFO."""
    vaddr = int(vmcoreinfo[f"SYMBOL({symbol})"], 16)
    phys_base = int(vmcoreinfo["NUMBER(phys_base)"]) & 0xFFFFFFFFFFFFFFFF
    return (vaddr - START_KERNEL_MAP + phys_base) & 0xFFFFFFFFFFFFFFFF


def printk_head_addr(vmcoreinfo: dict[str, str]) -> int:
    """Guest-physical address of ``printk_rb_static.desc_ring.head_id``,
    which moves with every kernel message."""
    off = (int(vmcoreinfo["OFFSET(printk_ringbuffer.desc_ring)"])
           + int(vmcoreinfo["OFFSET(prb_desc_ring.head_id)"]))
    return kernel_image_phys(vmcoreinfo, "printk_rb_static") + off


def printk_head_id(pmem_path: Path, vmcoreinfo: dict[str, str]) -> int:
    with open(pmem_path, "rb") as f:
        f.seek(printk_head_addr(vmcoreinfo))
        return int(struct.unpack("<Q", f.read(8))[0])


def kill_quietly(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
