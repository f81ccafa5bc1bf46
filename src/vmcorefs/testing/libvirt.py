"""libvirtd and transient test domains, for the libvirt tests and the demo.

libvirtd runs here without systemd: :func:`start_libvirtd` starts virtlogd
and libvirtd (``-d``) when ``qemu:///system`` does not answer and returns
the pid files of what it started, for :func:`stop_libvirtd`.
:func:`boot_domain` starts a transient domain (``virsh create``, ``type='qemu'``:
TCG) with direct kernel boot of a test kernel and initramfs, and waits for
its ready line on the serial log; :func:`destroy` ends it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vmcorefs.testing.guests import DEBIAN12, KernelAssets, booted, wait_booted
from vmcorefs.testing.mounts import wait_for

URI = "qemu:///system"
LIBVIRTD_PID = "/run/libvirtd.pid"
VIRTLOGD_PID = "/run/virtlogd.pid"


class LibvirtUnavailable(RuntimeError):
    """libvirtd cannot be started here."""


def virsh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``virsh -c qemu:///system ARGS``; ``check``: fail (AssertionError) unless it exits 0."""
    r = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"virsh {' '.join(args)}: {r.stderr.strip()}"
    return r


def libvirtd_answers() -> bool:
    return virsh("list", check=False, timeout=30).returncode == 0


def _pid_file(path: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path(path).read_text().split()[0])
    return None


def _running(pid_file: str) -> int | None:
    """The PID in ``pid_file`` if that process exists."""
    pid = _pid_file(pid_file)
    return pid if pid is not None and os.path.exists(f"/proc/{pid}") else None


def _start_daemon(command: str, pid_file: str) -> None:
    """``COMMAND -d`` (it forks); back once its pid file names it (10 s at most)."""
    subprocess.run([command, "-d"], check=False)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: _running(pid_file) is not None, 10, f"{command} pid file", interval=0.1)


def start_libvirtd(timeout: float = 300) -> list[str]:
    """libvirtd (and virtlogd) answering on qemu:///system, started here
    (without systemd) when needed; the pid files of the daemons started,
    for :func:`stop_libvirtd`.  libvirtd probes QEMU when it starts: on a
    busy machine that takes a while.  Raises :class:`LibvirtUnavailable`."""
    for tool in ("virsh", "libvirtd", "virtlogd"):
        if shutil.which(tool) is None:
            raise LibvirtUnavailable(f"{tool} missing (apt-get install libvirt-daemon-system)")
    started: list[str] = []
    if libvirtd_answers():
        return started
    try:
        os.makedirs("/var/log/libvirt", exist_ok=True)
        if _running(VIRTLOGD_PID) is None:
            _start_daemon("virtlogd", VIRTLOGD_PID)
            started.append(VIRTLOGD_PID)
        deadline = time.monotonic() + timeout
        while not libvirtd_answers():
            if _running(LIBVIRTD_PID) is None:  # not started, or an old one just exited
                _start_daemon("libvirtd", LIBVIRTD_PID)
                if LIBVIRTD_PID not in started:
                    started.append(LIBVIRTD_PID)
            if time.monotonic() > deadline:
                raise LibvirtUnavailable("cannot start libvirtd (libvirtd -d)")
            time.sleep(0.5)
    except BaseException:
        stop_libvirtd(started)
        raise
    return started


def stop_libvirtd(started: list[str]) -> None:
    """Stop the daemons of :func:`start_libvirtd` (whichever process each
    pid file names now: a test may have restarted libvirtd)."""
    for pid_file in reversed(started):
        pid = _running(pid_file)
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(AssertionError):  # libvirtd ends its own QEMU probes first
                wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 60, "daemon exit", interval=0.2)


def restart_libvirtd() -> None:
    """Restart libvirtd (running domains keep running); back once it answers."""
    if os.path.isdir("/run/systemd/system") and subprocess.run(
            ["systemctl", "is-active", "--quiet", "libvirtd"], check=False).returncode == 0:
        subprocess.run(["systemctl", "restart", "libvirtd"], check=True)
    else:
        pid = _pid_file(LIBVIRTD_PID)
        assert pid is not None, f"libvirtd runs without systemd and without {LIBVIRTD_PID}"
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 120, "libvirtd exit", interval=0.2)
        subprocess.run(["libvirtd", "-d"], check=True)
    wait_for(libvirtd_answers, 300, "libvirtd answering again", interval=0.5)


@dataclass
class Domain:
    """A transient libvirt domain booted from a test kernel."""

    name: str
    uuid: str
    dir: Path
    memory: str

    @property
    def serial(self) -> Path:
        return self.dir / "serial.log"

    def state(self) -> str:
        return virsh("domstate", self.name).stdout.strip()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        virsh("suspend", self.name)
        try:
            yield
        finally:
            virsh("resume", self.name)


def domain_xml(name: str, uid: str, directory: Path, memory: str, vmcoreinfo: bool, mib: int = 256) -> str:
    """A TCG domain of 2 vCPUs (ACPI on: without its MADT the guest brings
    up one CPU) and ``mib`` MiB (``pc`` machine): libvirt's
    default private RAM (``memory='private'``) or memfd RAM shared with
    vmcorefs (``'memfd'``); kernel, initramfs and serial log in ``directory``."""
    backing = ("<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
               if memory == "memfd" else "")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uid}</uuid>
  <memory unit='MiB'>{mib}</memory>
  <vcpu>2</vcpu>
  {backing}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{directory / 'vmlinuz'}</kernel>
    <initrd>{directory / 'initramfs.cpio.gz'}</initrd>
    <cmdline>console=ttyS0 panic=-1 printk.devkmsg=on no_timer_check</cmdline>
  </os>
  <features><acpi/><apic/>{"<vmcoreinfo state='on'/>" if vmcoreinfo else ""}</features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='{directory / 'serial.log'}'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <video><model type='none'/></video>
  </devices>
</domain>
"""


def boot_domain(name: str, memory: str, vmcoreinfo: bool, mib: int = 256, kernel: KernelAssets = DEBIAN12,
                timeout: float = 180) -> Domain:
    """Transient domain ``name`` (``virsh create``) of ``kernel``, booted
    (its ready line on the serial log); its directory (kernel, initramfs,
    serial log) is readable by libvirt-qemu.  Destroyed if it does not
    come up."""
    directory = Path(tempfile.mkdtemp(prefix=f"vmcorefs-libvirt-{memory}-"))
    dom = Domain(name, str(uuid.uuid4()), directory, memory)
    try:
        os.chmod(directory, 0o755)  # QEMU runs as libvirt-qemu
        shutil.copy(kernel.kernel, directory / "vmlinuz")
        shutil.copy(kernel.initramfs, directory / "initramfs.cpio.gz")
        for f in ("vmlinuz", "initramfs.cpio.gz"):
            os.chmod(directory / f, 0o644)
        (directory / "domain.xml").write_text(domain_xml(name, dom.uuid, directory, memory, vmcoreinfo, mib))
        virsh("create", str(directory / "domain.xml"))
        wait_booted(name, lambda: booted(dom.serial), dom.serial, timeout)
    except BaseException:
        destroy(dom)
        raise
    return dom


def destroy(dom: Domain) -> None:
    """End the domain (if it runs) and remove its directory."""
    virsh("destroy", dom.name, check=False)
    shutil.rmtree(dom.dir, ignore_errors=True)
