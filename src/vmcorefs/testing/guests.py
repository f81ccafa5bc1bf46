"""Test guests: what to boot (:class:`GuestSpec`) and the running QEMU (:class:`QemuGuest`).

The one place that knows the QEMU command line of the test, benchmark and
demo guests: TCG, the busybox initramfs of ``scripts/build-guest.sh`` (whose
``/init`` prints ``VMCOREFS-GUEST-READY <release>`` on the serial console
once it runs, then writes ten kernel messages a second), ``-device
vmcoreinfo``, and two QMP monitors -- ``qmp.sock`` for vmcorefs (or drgn),
``own-qmp.sock`` for the caller's own commands (QMP serves one client per
monitor).

A spec is a frozen dataclass: new guest kinds are new values, e.g. another
QEMU (:class:`Qemu`, :meth:`Qemu.unpacked`) or another kernel
(:class:`KernelAssets`)::

    spec = GuestSpec("k510", kernel=DEBIAN11, mib=512, memory="private")
    with QemuGuest(spec) as g:          # booted; killed at exit
        g.qmp("query-status")           # on the guest's own monitor
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from qemu.qmp import QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

#: Where ``scripts/build-guest.sh`` and ``scripts/build-tools.sh`` put guests and tools.
CACHE = Path(os.environ.get("VMCOREFS_CACHE", "/var/cache/vmcorefs"))
#: What the guest's /init prints on the serial console when it is up.
READY = b"VMCOREFS-GUEST-READY"
#: File names inside a guest's directory.
QMP_SOCKET, OWN_QMP_SOCKET, CONSOLE_SOCKET, SERIAL_LOG, QEMU_LOG, PID_FILE = (
    "qmp.sock", "own-qmp.sock", "console.sock", "serial.log", "qemu.log", "qemu.pid")

MemoryKind = Literal["memfd", "private", "private-noreserve", "none"]

#: Objects (guests, mounts, scratch files) still to close; see :func:`close_all`.
LIVE: list[Any] = []


class Unavailable(RuntimeError):
    """A guest cannot be booted here (kernel not built, QEMU not installed)."""


def require(ok: bool, why: str) -> None:
    """Nothing when ``ok``; else, under pytest, skip the test -- but fail it
    when ``CI=true`` (CI installs everything); outside pytest (benchmarks,
    the demo), raise :class:`Unavailable`."""
    if ok:
        return
    if "pytest" not in sys.modules:
        raise Unavailable(why)
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"missing dependency in CI: {why}")
    pytest.skip(why)


def close_all() -> None:
    """Close every guest, mount and scratch file still open, newest first."""
    while LIVE:
        obj = LIVE.pop()
        with contextlib.suppress(Exception):
            obj.close()


@dataclass(frozen=True)
class KernelAssets:
    """A guest kernel as ``scripts/build-guest.sh`` leaves it in ``dir``:
    ``vmlinuz``, ``initramfs.cpio.gz``, ``release`` (``uname -r``) and,
    with ``--dbg``, the debug ``vmlinux``."""

    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.dir / "initramfs.cpio.gz"

    @property
    def vmlinux(self) -> Path:
        """The debug vmlinux (may be missing: check with ``.exists()``)."""
        return self.dir / "vmlinux"

    @property
    def release(self) -> str:
        return (self.dir / "release").read_text().strip()

    def missing(self) -> str | None:
        """Why this kernel cannot boot, or None."""
        if not (self.kernel.exists() and self.initramfs.exists() and (self.dir / "release").exists()):
            return f"guest not built ({self.dir}); run scripts/setup.sh"
        return None


#: Debian 12's cloud kernel (6.1): the default guest.
DEBIAN12 = KernelAssets(CACHE / "guest")
#: Debian 11's cloud kernel (5.10), which crash 8.0.2 fully understands (``build-guest.sh --old``).
DEBIAN11 = KernelAssets(CACHE / "guest-bullseye")
#: bookworm-backports' cloud kernel (6.12; needs QEMU 10 under TCG; ``build-guest.sh --backports``).
BACKPORTS = KernelAssets(CACHE / "guest-backports")
#: Debian 12's arm64 cloud kernel (6.1; ``build-guest.sh --arm64``), for :data:`ARM64_SPEC`.
ARM64 = KernelAssets(CACHE / "guest-arm64")


@dataclass(frozen=True)
class Qemu:
    """A QEMU binary; ``firmware`` is given to ``-L`` (BIOS, option ROMs)
    and ``env`` is added to its environment (``LD_LIBRARY_PATH``)."""

    binary: str = "qemu-system-x86_64"
    firmware: Path | None = None
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def unpacked(cls, root: Path) -> Qemu:
        """A QEMU unpacked with ``dpkg -x`` under ``root`` (``usr/bin``,
        ``usr/share/qemu`` for -L, and ``lib/`` for libraries newer than
        the system's, when present)."""
        lib = root / "lib"
        return cls(str(root / "usr/bin/qemu-system-x86_64"), root / "usr/share/qemu",
                   (("LD_LIBRARY_PATH", str(lib)),) if lib.is_dir() else ())

    def missing(self) -> str | None:
        """Why this QEMU cannot run, or None."""
        if shutil.which(self.binary) is None:
            return f"{self.binary} not installed"
        return None

    def environ(self) -> dict[str, str]:
        return {**os.environ, **dict(self.env)}


#: Debian 12's QEMU (7.2), on PATH.
SYSTEM_QEMU = Qemu()
#: QEMU 10 of bookworm-backports, unpacked by ``scripts/build-tools.sh qemu``.
QEMU10 = Qemu.unpacked(CACHE / "qemu-10")
#: Debian 12's qemu-system-aarch64 (package qemu-system-arm), on PATH.
SYSTEM_QEMU_AARCH64 = Qemu("qemu-system-aarch64")


#: The guest kernel's command line.  /init logs ten kernel messages a
#: second: the default 128 KiB printk ring loses the boot messages tests
#: look for (``Linux version ...``) after ~5 minutes, less than a suite keeps
#: its guests; 2 MiB (~9 MiB of guest RAM with the descriptors) hold ~1.5
#: hours.  The kernel then logs to ``printk_rb_dynamic``, which
#: :func:`~vmcorefs.testing.probes.printk_head_addr` follows.
#: ``no_timer_check``: on a busy host a TCG vCPU can miss the early check
#: that the timer interrupt arrives, and the kernel panics ("IO-APIC + timer
#: doesn't work!"; seen in a loaded suite run).
APPEND = "console=ttyS0 panic=-1 printk.devkmsg=on log_buf_len=2M no_timer_check"


@dataclass(frozen=True)
class GuestSpec:
    """What to boot.

    ``memory``: ``memfd`` (``memory-backend-memfd,share=on``: vmcorefs
    preads the memfd), ``private`` (QEMU's own anonymous RAM, ``-m``),
    ``private-noreserve`` (the same as ``memory-backend-ram,reserve=off``,
    for guests larger than the host's overcommit allows), ``none`` (no
    ``-m`` and no backend: ``extra`` says it all).  ``mib`` is the guest's
    RAM in MiB.  ``reboot``: a guest reset reboots (else QEMU exits).
    ``boot_timeout`` (seconds) defaults to 120 s plus 1 s per 2 GiB.
    ``console``: the serial console (ttyS0, /init's shell) is also a socket
    that :meth:`QemuGuest.send_console` types into; it is logged to
    ``serial.log`` either way.  ``fw_cfg=False``: the guest kernel refuses
    to load ``qemu_fw_cfg`` (``module_blacklist=`` on its command line; the
    initramfs is the same), so it never registers VMCOREINFO with
    ``-device vmcoreinfo`` although the device is there.  ``bare``: no
    kernel (no ``-kernel``, ``-initrd``, ``-append``): the machine runs its
    firmware, or stays at reset with ``-S`` in ``extra``; it is ready once
    its monitor listens.
    """

    name: str = "guest"
    qemu: Qemu = SYSTEM_QEMU
    kernel: KernelAssets = DEBIAN12
    machine: str = "pc"
    memory: MemoryKind = "memfd"
    mib: int = 256
    vcpus: int = 2
    vmcoreinfo: bool = True
    reboot: bool = False
    extra: tuple[str, ...] = ()
    cpu: str = "qemu64"
    append: str = APPEND
    boot_timeout: float | None = None
    console: bool = False
    fw_cfg: bool = True
    bare: bool = False

    @property
    def timeout(self) -> float:
        return self.boot_timeout if self.boot_timeout is not None else 120.0 + self.mib / 2048

    def missing(self) -> str | None:
        """Why this guest cannot boot here, or None."""
        return self.qemu.missing() or (None if self.bare else self.kernel.missing())

    def command(self, directory: Path) -> list[str]:
        """The QEMU command line, with its sockets and logs in ``directory``."""
        args = [
            self.qemu.binary, *(["-L", str(self.qemu.firmware)] if self.qemu.firmware else []),
            "-accel", "tcg", "-cpu", self.cpu, "-smp", str(self.vcpus),
            "-display", "none", "-vga", "none", "-nodefaults", *([] if self.reboot else ["-no-reboot"]),
            *([] if self.bare else [
                "-kernel", str(self.kernel.kernel), "-initrd", str(self.kernel.initramfs),
                "-append", self.append if self.fw_cfg else f"{self.append} module_blacklist=qemu_fw_cfg"]),
            *(["-chardev", f"socket,id=serial0,path={directory / CONSOLE_SOCKET},server=on,wait=off,"
               f"logfile={directory / SERIAL_LOG}", "-serial", "chardev:serial0"] if self.console
              else ["-serial", f"file:{directory / SERIAL_LOG}"]),
            "-qmp", f"unix:{directory / QMP_SOCKET},server=on,wait=off",
            "-qmp", f"unix:{directory / OWN_QMP_SOCKET},server=on,wait=off",
        ]
        if self.vmcoreinfo:
            args += ["-device", "vmcoreinfo"]
        size = f"size={self.mib}M"
        if self.memory == "memfd":
            args += ["-m", f"{self.mib}M", "-object", f"memory-backend-memfd,id=mem0,{size},share=on",
                     "-machine", f"{self.machine},memory-backend=mem0"]
        elif self.memory == "private-noreserve":
            # `-m` alone fails beyond the host's overcommit limit ("cannot set
            # up guest memory 'pc.ram'"); this is the same private anonymous
            # RAM, mapped MAP_NORESERVE (QEMU >= 6.1).
            args += ["-m", f"{self.mib}M", "-object", f"memory-backend-ram,id=mem0,{size},reserve=off",
                     "-machine", f"{self.machine},memory-backend=mem0"]
        elif self.memory == "private":
            args += ["-m", f"{self.mib}M", "-machine", self.machine]
        elif self.memory == "none":
            args += ["-machine", self.machine]
        else:
            raise ValueError(f"memory kind {self.memory!r}")
        return args + list(self.extra)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def booted(serial: Path) -> bool:
    """Whether /init has announced itself (:data:`READY`) in the serial log ``serial``."""
    return READY in _read(serial)


def wait_booted(name: str, ready: Callable[[], bool], serial: Path, timeout: float,
                exited: Callable[[], str | None] = lambda: None) -> None:
    """The one readiness wait of the test guests (QEMU's, libvirt's): poll
    ``ready()`` every 0.1 s, e.g. ``booted(serial)``.  Raises RuntimeError when ``exited()`` gives a reason (the
    guest's process is gone), TimeoutError after ``timeout`` seconds; both
    say ``name`` and end with the tail of ``serial``."""
    deadline = time.monotonic() + timeout
    while not ready():
        reason = exited()
        if reason is not None:
            raise RuntimeError(f"guest {name}: {reason}; serial: {_read(serial)[-3000:].decode(errors='replace')}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"guest {name} did not boot in {timeout:g} s; "
                               f"serial: {_read(serial)[-3000:].decode(errors='replace')}")
        time.sleep(0.1)


#: How many times :meth:`QemuGuest.wait_ready` restarts a first boot that
#: timed out.  A TCG guest kernel on a busy host has, rarely, hung early in
#: boot with its serial log silent (seen once in a suite of ~100 boots:
#: 2 vCPUs, QEMU 7.2, after "IP idents hash table entries"); the restart
#: is printed, and a second hang fails.
BOOT_RESTARTS = 1


def _vcpu_pcs(qmp_path: str, timeout: float = 10.0) -> str:
    """The RIP/PC of each vCPU of the QEMU at ``qmp_path`` from HMP ``info
    registers -a``, or why they could not be read (within ``timeout`` s)."""
    async def ask() -> str:
        client = QMPClient("hung-guest")
        await client.connect(qmp_path)
        try:
            return str(await client.execute("human-monitor-command", {"command-line": "info registers -a"}))
        finally:
            await client.disconnect()
    try:
        text = asyncio.run(asyncio.wait_for(ask(), timeout))
    except Exception as e:  # a diagnostic only: any failure is reported, not raised
        return f"unknown ({type(e).__name__}: {e})"
    return " ".join(re.findall(r"\b(?:RIP|EIP|PC)=\S+", text)) or "unknown"


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass


class QemuGuest:
    """A running QEMU of ``spec`` (started by the constructor; call
    :meth:`wait_ready`, or use ``with``, which waits and closes).

    ``dir`` holds its sockets and logs; ``qmp_path`` is the monitor for
    vmcorefs, ``own_qmp_path`` the one :meth:`qmp` uses.  ``detach``: QEMU
    gets its own session and outlives this process (``python -m
    vmcorefs.testing boot``); the caller kills it by its pid file.
    """

    def __init__(self, spec: GuestSpec, directory: Path | None = None, detach: bool = False) -> None:
        why = spec.missing()
        require(why is None, why or "")
        self.spec = spec
        self.release = "" if spec.bare else spec.kernel.release
        self.dir = directory or Path(tempfile.mkdtemp(prefix=f"vmcorefs-{spec.name}-"))
        self._own_dir = directory is None
        self.qmp_path = str(self.dir / QMP_SOCKET)
        self.own_qmp_path = str(self.dir / OWN_QMP_SOCKET)
        self.serial = self.dir / SERIAL_LOG
        self.args = spec.command(self.dir)
        self.boot_s: float | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._console: socket.socket | None = None
        self._t_start = time.monotonic()
        self._detach = detach
        self.restarts = 0
        self._start()
        LIVE.append(self)

    def _start(self) -> None:
        with open(self.dir / QEMU_LOG, "wb") as log:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.spec.qemu.environ(), start_new_session=self._detach)
        (self.dir / PID_FILE).write_text(f"{self.proc.pid}\n")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def mem_mb(self) -> int:
        return self.spec.mib

    def log(self) -> str:
        """QEMU's own output (stdout and stderr)."""
        return (self.dir / QEMU_LOG).read_text(errors="replace")

    def wait_ready(self, timeout: float | None = None) -> QemuGuest:
        """Wait until /init announces itself on the serial console (again,
        after a reset: empty ``serial`` first); a ``bare`` machine, until its
        monitors listen.  Raises RuntimeError if QEMU exits, TimeoutError
        after ``timeout`` (default ``spec.timeout``) s."""
        def exited() -> str | None:
            if self.proc.poll() is None:
                return None
            return f"QEMU exited ({self.proc.returncode}): {self.log()[-2000:]}"
        if self.spec.bare:
            sockets = (Path(self.qmp_path), Path(self.own_qmp_path))
            wait_booted(self.spec.name, lambda: all(p.exists() for p in sockets), self.serial, timeout or 30.0,
                        exited)
        else:
            limit = self.spec.timeout if timeout is None else timeout
            try:
                wait_booted(self.spec.name, lambda: booted(self.serial), self.serial, limit, exited)
            except TimeoutError as e:
                if self.boot_s is not None or self.restarts >= BOOT_RESTARTS:
                    raise
                self._restart_hung(e)
                wait_booted(self.spec.name, lambda: booted(self.serial), self.serial, limit, exited)
        if self.boot_s is None:
            self.boot_s = time.monotonic() - self._t_start
        return self

    def _restart_hung(self, hung: TimeoutError) -> None:
        """Kill a guest whose first boot hung and start it again, saying so on
        stderr with where its vCPUs were (``info registers -a``: RIP, EIP or PC) and
        keeping its serial log as ``serial-hungN.log`` (N: the restart)."""
        self.restarts += 1
        where = _vcpu_pcs(self.own_qmp_path)
        self._disconnect()
        self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(OSError):
            self.serial.replace(self.dir / f"serial-hung{self.restarts}.log")
        print(f"\nguest {self.spec.name}: first boot hung, restarting it once (vCPUs at {where}): "
              f"{str(hung)[-600:]}", file=sys.stderr)
        self._start()

    def __enter__(self) -> QemuGuest:
        try:
            return self.wait_ready()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the caller's own monitor ------------------------------------------------

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command on the guest's own monitor (never vmcorefs')."""
        if self._qmp is None:
            self._qmp = QEMUMonitorProtocol(self.own_qmp_path)
            self._qmp.connect()
        return self._qmp.cmd(command, **arguments)

    def release_qmp(self) -> None:
        """Disconnect from the own monitor, so that another client (``vmcorefs
        info``) may use it; the next :meth:`qmp` reconnects."""
        if self._disconnect():
            time.sleep(0.2)

    def _disconnect(self) -> bool:
        if self._qmp is None:
            return False
        with contextlib.suppress(Exception):
            self._qmp.close()
        self._qmp = None
        return True

    def hmp(self, line: str) -> str:
        return str(self.qmp("human-monitor-command", **{"command-line": line}))

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def events(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """QMP events received on the own monitor since the last call
        (waiting up to ``wait`` seconds for one when there are none)."""
        if self._qmp is None:
            self.qmp("query-status")
        assert self._qmp is not None
        return list(self._qmp.get_events(wait=wait) if wait else self._qmp.get_events())

    def clear_events(self) -> None:
        self.events()
        assert self._qmp is not None
        self._qmp.clear_events()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The guest stopped for the block; resumed after if it was running."""
        was_running = self.status() == "running"
        self.qmp("stop")
        try:
            yield
        finally:
            if was_running:
                self.qmp("cont")

    def dump(self, path: Path) -> Path:
        """QEMU's own ``dump-guest-memory`` (paging=false) into ``path``: the oracle."""
        self.qmp("dump-guest-memory", paging=False, protocol=f"file:{path}")
        return path

    def send_console(self, data: bytes) -> None:
        """Type ``data`` on the serial console (``spec.console`` guests).
        The first call connects; a thread then reads and drops what the
        guest writes (``serial.log`` has it), since QEMU stalls the guest's
        serial port when the socket is full."""
        if self._console is None:
            if not self.spec.console:
                raise ValueError(f"guest {self.spec.name} has no console socket (GuestSpec.console)")
            self._console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._console.connect(str(self.dir / CONSOLE_SOCKET))
            threading.Thread(target=_drain, args=(self._console,), daemon=True).start()
        self._console.sendall(data)

    def gpa2hva(self, gpa: int) -> int:
        """QEMU's host virtual address of guest-physical ``gpa`` (HMP gpa2hva)."""
        return int(self.hmp(f"gpa2hva {gpa:#x}").rsplit(" ", 1)[1], 16)

    def close(self) -> None:
        """Kill QEMU and remove its directory (if this object made it)."""
        self._disconnect()
        if self._console is not None:
            with contextlib.suppress(OSError):
                self._console.shutdown(socket.SHUT_RDWR)
            self._console.close()
            self._console = None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(ValueError):
            LIVE.remove(self)


# --- arm64 guest (issue 14) ---------------------------------------------------

#: An arm64 guest: ``-M virt`` (RAM from 1 GiB, no firmware for -kernel
#: boot; QEMU's device tree gives the kernel a KASLR seed), ``-cpu max``
#: (pointer authentication, SVE: QEMU writes NT_ARM_SVE notes) with
#: ``pauth-impdef=on`` (QEMU's cheap PAC algorithm instead of emulating
#: QARMA5: boots in half the time under TCG), two vCPUs,
#: 512 MiB as two NUMA nodes -- node 0 ``memory-backend-memfd,share=on``
#: (read by pread on the memfd), node 1 ``memory-backend-ram`` (QEMU's
#: private RAM, read through /proc/PID/mem) -- so one boot covers both
#: kinds.  The console is the PL011, ``ttyAMA0``.
ARM64_SPEC = GuestSpec(
    "arm64", qemu=SYSTEM_QEMU_AARCH64, kernel=ARM64, machine="virt", cpu="max,pauth-impdef=on", memory="none",
    mib=512,
    append="console=ttyAMA0 panic=-1 printk.devkmsg=on",
    extra=("-m", "512M",
           "-object", "memory-backend-memfd,id=mem0,size=256M,share=on",
           "-object", "memory-backend-ram,id=mem1,size=256M",
           "-numa", "node,nodeid=0,cpus=0,memdev=mem0", "-numa", "node,nodeid=1,cpus=1,memdev=mem1"),
    boot_timeout=600)

#: :data:`ARM64_SPEC` on ``-cpu cortex-a57`` (ARMv8.0: no pointer
#: authentication, no SVE, so QEMU writes no NT_ARM_SVE notes).
ARM64_A57_SPEC = replace(ARM64_SPEC, name="arm64-a57", cpu="cortex-a57")
