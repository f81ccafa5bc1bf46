"""A libvirt domain as vmcorefs sees it: QMP through libvirt, no dump, state through libvirt.

libvirt owns its QEMU's monitor, so vmcorefs speaks QMP through libvirt's
passthrough (``virDomainQemuMonitorCommand``, Python
``libvirt_qemu.qemuMonitorCommand``).  Using it marks the domain tainted
(``custom-monitor`` in its log and ``virsh dominfo``); nothing else changes.

* :class:`LibvirtMonitor` has the :class:`~vmcorefs.qemu.monitor.Monitor`
  methods the guest code uses (``execute``, ``hmp``, ``gpa2hva``, ``pid``,
  ``version``, ``path``); each command is one blocking libvirt call, run
  in a thread so that the daemon's event loop never waits on libvirtd.
* :class:`LibvirtGuest` is a :class:`~vmcorefs.qemu.guest.Guest` whose notes
  come from HMP ``info registers -a``
  (:func:`vmcorefs.qemu.registers.read_x86_vcpus`) instead of a
  ``dump-guest-memory``: libvirtd 9.0 crashes on the ``DUMP_COMPLETED``
  event of a dump it did not start, so vmcorefs never dumps through
  libvirt.  VMCOREINFO comes from the guest-RAM finder the snapshot already
  uses when the notes carry none.  Pause, resume and status go through
  libvirt (``virDomainSuspend``/``Resume``/``GetState``) so that libvirt's
  view of the domain stays right.

The QEMU PID (guest memory is read from the process, as for a QMP socket) is
found through QMP ``query-cpus-fast``: a vCPU's ``thread-id`` is a thread of
QEMU, whose thread group (``Tgid`` in ``/proc/TID/status``) is QEMU's PID.
This needs no access to libvirt's run directory and works for any local
URI; the process's command line must carry the domain's ``-uuid``, which
rejects a remote URI whose thread ids mean nothing here.

Only x86 guests (the notes are built from x86 registers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import Any, Callable, Iterator, TypeVar

from qemu.qmp import EventListener

from vmcorefs.core.elf import EI_CLASS, EI_DATA, EI_NIDENT, ELFCLASS64, ELFDATA2LSB, ELFMAG, EV_CURRENT, DumpInfo
from vmcorefs.core.memmap import GuestPhysBlock
from vmcorefs.core.x86_notes import build_x86_notes
from vmcorefs.errors import LibvirtError, QEMUGoneError, QMPError, QMPTimeoutError, UsageError
from vmcorefs.qemu.guest import Guest
from vmcorefs.qemu.monitor import COMMAND_TIMEOUT, Monitor
from vmcorefs.qemu.registers import read_x86_vcpus, uses_tcg

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
# <elf.h>
EI_VERSION = 6
EM_386, EM_X86_64 = 3, 62

T = TypeVar("T")


def _import_libvirt() -> tuple[Any, Any]:
    """The ``libvirt`` and ``libvirt_qemu`` modules (libvirt-python)."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError as e:
        raise LibvirtError(f"the Python binding is not installed ({e}; pip install 'vmcorefs[libvirt]')") from None
    return libvirt, libvirt_qemu


def _message(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def open_domain(uri: str, name: str) -> tuple[Any, Any]:
    """Connect to ``uri`` and look up the running domain ``name`` (a name,
    UUID or numeric id, as virsh takes them); returns ``(connection, domain)``.

    Raises :class:`UsageError` for an unknown or inactive domain,
    :class:`LibvirtError` when libvirtd cannot be reached or the binding is
    missing.  Blocking (call it from a thread in an event loop).
    """
    libvirt, _ = _import_libvirt()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no printing to stderr
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise LibvirtError(f"cannot connect to {uri}: {_message(e)} (is libvirtd running?)", "open") from None
    dom = None
    lookups: list[Callable[[], Any]] = [lambda: conn.lookupByName(name)]
    if re.fullmatch(r"[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}", name):
        lookups.append(lambda: conn.lookupByUUIDString(name))
    if name.isdigit() and int(name) < 1 << 31:
        lookups.append(lambda: conn.lookupByID(int(name)))
    for lookup in lookups:
        try:
            dom = lookup()
            break
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                conn.close()
                raise LibvirtError(_message(e), "lookup") from None
    if dom is None:
        conn.close()
        raise UsageError(f"{uri}: no domain {name!r} (see 'virsh -c {uri} list --all')")
    if not dom.isActive():
        conn.close()
        raise UsageError(f"{uri}: domain {dom.name()!r} is not running")
    return conn, dom


class LibvirtMonitor(Monitor):
    """QMP of a libvirt domain through libvirt's monitor passthrough.

    Use :func:`connect` to make one.  Shares :class:`Monitor`'s interface
    (``hmp`` and ``gpa2hva`` are Monitor's, built on :meth:`execute`), not
    its connection: there is no socket, so :meth:`send_fd` is refused.
    """

    def __init__(self, conn: Any, dom: Any, uri: str, timeout: float = COMMAND_TIMEOUT) -> None:  # noqa: D107
        # Monitor.__init__ wants a qemu.qmp client; this monitor has none.
        self._libvirt, self._libvirt_qemu = _import_libvirt()
        self.conn = conn
        self.dom = dom
        self.uri = uri
        self.name = str(dom.name())
        self.uuid = str(dom.UUIDString())
        self.timeout = timeout
        self.path = f"{uri} domain {self.name}"
        self.pid: int | None = None
        self.version = "unknown"
        self.gone = False

    async def call(self, what: str, fn: Callable[[Any], T], timeout: float | None = None) -> T:
        """``fn(domain)`` (a blocking libvirt call named ``what``) in a thread.

        When libvirtd has closed the connection (it restarted), connects
        again and retries once.  Raises :class:`QMPTimeoutError` after
        ``timeout`` seconds (the thread finishes on its own),
        :class:`QEMUGoneError` when the domain is no longer running,
        :class:`QMPError` for any other libvirt error.
        """
        timeout = self.timeout if timeout is None else timeout
        if self.gone:
            raise QEMUGoneError("the domain is no longer running", what)
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            try:
                return await asyncio.wait_for(loop.run_in_executor(None, fn, self.dom), timeout)
            except asyncio.TimeoutError:
                raise QMPTimeoutError(f"no answer from libvirt within {timeout:g} s", what) from None
            except self._libvirt.libvirtError as e:
                if attempt == 0 and await self._blocking(what, self._reconnect, timeout):
                    continue
                if e.get_error_code() in (self._libvirt.VIR_ERR_NO_DOMAIN, self._libvirt.VIR_ERR_OPERATION_INVALID) \
                        and not await self._blocking(what, self._active, timeout):
                    self.gone = True
                    raise QEMUGoneError(f"the domain is no longer running ({_message(e)})", what) from None
                raise QMPError(f"libvirt: {_message(e)}", what) from None
        raise AssertionError("unreachable")

    async def _blocking(self, what: str, fn: Callable[[], bool], timeout: float) -> bool:
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, fn), timeout)
        except asyncio.TimeoutError:
            raise QMPTimeoutError(f"no answer from libvirt within {timeout:g} s", what) from None

    def _reconnect(self) -> bool:
        """A new connection and domain handle when the connection is dead
        (libvirtd restarted): True if made.  Blocking."""
        libvirt = self._libvirt
        try:
            if self.conn.isAlive():
                return False
        except libvirt.libvirtError:
            pass
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            log.info("libvirt: cannot connect again to %s: %s", self.uri, _message(e))
            return False
        try:
            dom = conn.lookupByUUIDString(self.uuid)
        except libvirt.libvirtError:
            conn.close()
            return False
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()
        self.conn, self.dom = conn, dom
        log.info("libvirt: connected again to %s", self.uri)
        return True

    def _active(self) -> bool:
        """Whether the domain still runs (True when libvirt cannot tell).  Blocking."""
        try:
            return bool(self.dom.isActive())
        except self._libvirt.libvirtError as e:
            return bool(e.get_error_code() != self._libvirt.VIR_ERR_NO_DOMAIN)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """Run a QMP command through libvirt; every failure is a :class:`QMPError`."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        text = json.dumps(request)
        answer = await self.call(command, lambda dom: self._libvirt_qemu.qemuMonitorCommand(dom, text, 0), timeout)
        try:
            reply = json.loads(answer)
        except (TypeError, ValueError):
            raise QMPError("libvirt passed back an answer that is not JSON", command) from None
        if not isinstance(reply, dict):
            raise QMPError("answer is not a QMP reply", command)
        if "error" in reply:
            err = reply["error"]
            raise QMPError(str(err.get("desc", err) if isinstance(err, dict) else err), command)
        if "return" not in reply:
            raise QMPError("answer is not a QMP reply", command)
        return reply["return"]

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        """A listener that never hears anything: libvirt's passthrough
        carries no QMP events (libvirt consumes them).  So a resume by
        someone else during a ``--freeze`` pause is not seen."""
        yield EventListener(names)

    def send_fd(self, fd: int) -> None:
        """Refused: libvirt's passthrough carries no file descriptors."""
        raise QMPError("cannot pass file descriptors through libvirt", "getfd")

    async def find_pid(self) -> int:
        """QEMU's PID (see the module docstring); also fills :attr:`pid` and
        :attr:`version`.  Raises :class:`UsageError` when the process is not
        on this host."""
        try:
            v = (await self.execute("query-version"))["qemu"]
            self.version = f"{v['major']}.{v['minor']}.{v['micro']}"
        except (KeyError, TypeError):
            pass
        cpus = await self.execute("query-cpus-fast")
        tids = [c.get("thread-id") for c in cpus if isinstance(c, dict)] if isinstance(cpus, list) else []
        for tid in tids:
            if not isinstance(tid, int) or tid <= 0:
                continue
            pid = _tgid(tid)
            if pid is not None and self.uuid.lower() in _cmdline(pid).lower():
                self.pid = pid
                return pid
        raise UsageError(f"{self.path}: its QEMU process is not on this host (vmcorefs reads the guest's"
                         " memory from the QEMU process: run it on the domain's host)")

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.conn.close)
        except self._libvirt.libvirtError:
            pass


def _tgid(tid: int) -> int | None:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


async def connect(uri: str, name: str, timeout: float = COMMAND_TIMEOUT) -> LibvirtMonitor:
    """Connect to domain ``name`` of ``uri`` and find its QEMU process.

    Errors as :func:`open_domain` and :meth:`LibvirtMonitor.find_pid`.
    """
    loop = asyncio.get_running_loop()
    conn, dom = await loop.run_in_executor(None, open_domain, uri, name)
    monitor = LibvirtMonitor(conn, dom, uri, timeout)
    try:
        await monitor.find_pid()
    except BaseException:
        await monitor.close()
        raise
    return monitor


#: virDomainState -> QMP query-status's ``status`` names.
_STATES = {0: "none", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed",
           7: "suspended"}


class LibvirtGuest(Guest):
    """The QEMU of a libvirt domain: :class:`Guest` with notes from
    ``info registers -a`` and run state through libvirt."""

    monitor: LibvirtMonitor
    #: Notes built from registers: never the device's VMCOREINFO.
    device_notes = False

    def __init__(self, monitor: LibvirtMonitor, memory_mode: str = "auto") -> None:
        super().__init__(monitor, memory_mode)
        self._tcg: bool | None = None

    async def dump_info(self, blocks: list[GuestPhysBlock]) -> DumpInfo:
        """The ELF identity and notes QEMU's ``dump-guest-memory`` would give
        (without VMCOREINFO; the snapshot adds it from guest RAM): x86-64
        (``EM_X86_64``) when vCPU 0 is in long mode, i386 otherwise, as QEMU
        decides; ``p_vaddr = p_paddr`` as QEMU 7.2 writes.  Raises
        :class:`QMPError`, :class:`~vmcorefs.errors.FormatError`."""
        cpus = await read_x86_vcpus(self.monitor)
        if self._tcg is None:
            self._tcg = await uses_tcg(self.monitor)
        notes = build_x86_notes(cpus, None, tcg=self._tcg)
        ident = bytearray(EI_NIDENT)
        ident[:4] = ELFMAG
        ident[EI_CLASS], ident[EI_DATA], ident[EI_VERSION] = ELFCLASS64, ELFDATA2LSB, EV_CURRENT
        return DumpInfo(bytes(ident), EM_X86_64 if cpus[0].lma else EM_386, 0, notes, True)

    async def status(self) -> str:
        """libvirt's state of the domain as QMP status names: ``running``,
        ``paused``, ...  Raises :class:`QMPError`."""
        state = await self.monitor.call("virDomainGetState", lambda dom: dom.state())
        return _STATES.get(int(state[0]), "unknown")

    async def pause(self) -> None:
        """``virDomainSuspend``.  Raises :class:`QMPError`."""
        await self.monitor.call("virDomainSuspend", lambda dom: dom.suspend())

    async def resume(self) -> None:
        """``virDomainResume`` (nothing when the domain is not paused, as
        QMP ``cont``).  Raises :class:`QMPError`."""
        try:
            await self.monitor.call("virDomainResume", lambda dom: dom.resume())
        except QMPError:
            if await self.status() == "paused":
                raise

    async def info(self) -> dict[str, Any]:
        """:meth:`Guest.info` with the libvirt URI and domain."""
        info = await super().info()
        info["libvirt"] = {"uri": self.monitor.uri, "domain": self.monitor.name, "uuid": self.monitor.uuid}
        return info
