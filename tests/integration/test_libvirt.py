"""``vmcorefs mount/info --domain`` on real libvirt domains (libvirtd, TCG, direct kernel boot).

The fixture starts virtlogd and libvirtd when they are not running (and
stops what it started), then two transient domains of 2 vCPUs and 256 MiB:
libvirt's default private RAM, and memfd RAM shared with vmcorefs.  The
oracle is libvirt's own dump job (``virsh dump --memory-only --format
elf``) of the same paused domain.  vmcorefs never runs
``dump-guest-memory`` itself under libvirt (libvirtd 9.0 crashes on the
DUMP_COMPLETED event of a dump it did not start): every test checks that
libvirtd still answers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import pytest
from elftools.elf.elffile import ELFFile

from vmcorefs.core.notes import Note, parse_notes
from vmcorefs.testing import (
    load_mismatches,
    DEBIAN12,
    DRGN_KALLSYMS,
    Mount,
    is_mounted,
    require,
    run_vmcorefs,
    wait_for,
)

pytestmark = pytest.mark.integration
URI = "qemu:///system"
READY = b"VMCOREFS-GUEST-READY"
NT_PRSTATUS = 1


def virsh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
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


def restart_libvirtd() -> None:
    """Restart libvirtd (running domains keep running); back once it answers."""
    if os.path.isdir("/run/systemd/system") and subprocess.run(
            ["systemctl", "is-active", "--quiet", "libvirtd"], check=False).returncode == 0:
        subprocess.run(["systemctl", "restart", "libvirtd"], check=True)
    else:
        pid = _pid_file("/run/libvirtd.pid")
        assert pid is not None, "libvirtd runs without systemd and without /run/libvirtd.pid"
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 120, "libvirtd exit", interval=0.2)
        subprocess.run(["libvirtd", "-d"], check=True)
    wait_for(libvirtd_answers, 300, "libvirtd answering again", interval=0.5)


def _running(pid_file: str) -> int | None:
    """The PID in ``pid_file`` if that process exists."""
    pid = _pid_file(pid_file)
    return pid if pid is not None and os.path.exists(f"/proc/{pid}") else None


def _start_daemon(command: str, pid_file: str) -> None:
    """``COMMAND -d`` (it forks); back once its pid file names it (10 s at most)."""
    subprocess.run([command, "-d"], check=False)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: _running(pid_file) is not None, 10, f"{command} pid file", interval=0.1)


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    """libvirtd (and virtlogd) answering on qemu:///system; started here
    (without systemd) when needed, and then stopped at the end (the
    libvirtd of the moment: a test may restart it).  libvirtd
    probes QEMU when it starts: on a busy machine that takes a while."""
    for tool in ("virsh", "libvirtd", "virtlogd"):
        require(shutil.which(tool) is not None, f"{tool} missing (apt-get install libvirt-daemon-system)")
    require(importlib.util.find_spec("libvirt") is not None, "libvirt-python missing (pip install vmcorefs[libvirt])")
    require(DEBIAN12.missing() is None, DEBIAN12.missing() or "")
    started: list[str] = []  # pid files
    try:
        if not libvirtd_answers():
            os.makedirs("/var/log/libvirt", exist_ok=True)
            if _running("/run/virtlogd.pid") is None:
                _start_daemon("virtlogd", "/run/virtlogd.pid")
                started.append("/run/virtlogd.pid")
            deadline = time.monotonic() + 300
            while not libvirtd_answers():
                if _running("/run/libvirtd.pid") is None:  # not started, or an old one just exited
                    _start_daemon("libvirtd", "/run/libvirtd.pid")
                    if "/run/libvirtd.pid" not in started:
                        started.append("/run/libvirtd.pid")
                require(time.monotonic() < deadline, "cannot start libvirtd (libvirtd -d)")
                time.sleep(0.5)
        yield
    finally:
        for pid_file in reversed(started):
            pid = _running(pid_file)
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(AssertionError):  # libvirtd ends its own QEMU probes first
                    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 60, "daemon exit", interval=0.2)


@pytest.fixture(autouse=True)
def _libvirtd_survives(libvirtd: None) -> Iterator[None]:
    """After every test libvirtd still answers (it crashes on a dump it did
    not start: vmcorefs must never run one through it)."""
    yield
    assert libvirtd_answers(), "libvirtd stopped answering"


@dataclass
class Domain:
    """A transient libvirt domain booted from the test kernel."""

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


def _domain_xml(name: str, uid: str, directory: Path, memory: str, vmcoreinfo: bool) -> str:
    backing = ("<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
               if memory == "memfd" else "")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uid}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>2</vcpu>
  {backing}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{directory / 'vmlinuz'}</kernel>
    <initrd>{directory / 'initramfs.cpio.gz'}</initrd>
    <cmdline>console=ttyS0 panic=-1 printk.devkmsg=on</cmdline>
  </os>
  <features>{"<vmcoreinfo state='on'/>" if vmcoreinfo else ""}</features>
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


def boot_domain(memory: str, vmcoreinfo: bool, tag: str = "") -> Domain:
    """A transient domain (``virsh create``) of the test kernel, booted; its
    directory (kernel, initramfs, serial log) is readable by libvirt-qemu."""
    directory = Path(tempfile.mkdtemp(prefix=f"vmcorefs-libvirt-{memory}-"))
    uid = str(uuid.uuid4())
    dom = Domain(f"vmcorefs-test-{memory}{tag}-{os.getpid()}", uid, directory, memory)
    try:
        os.chmod(directory, 0o755)  # QEMU runs as libvirt-qemu
        shutil.copy(DEBIAN12.kernel, directory / "vmlinuz")
        shutil.copy(DEBIAN12.initramfs, directory / "initramfs.cpio.gz")
        for f in ("vmlinuz", "initramfs.cpio.gz"):
            os.chmod(directory / f, 0o644)
        (directory / "domain.xml").write_text(_domain_xml(dom.name, uid, directory, memory, vmcoreinfo))
        virsh("create", str(directory / "domain.xml"))
        wait_for(lambda: dom.serial.exists() and READY in dom.serial.read_bytes(), 180, f"{dom.name} boot",
                 interval=0.2)
    except BaseException:
        destroy(dom)
        raise
    return dom


def destroy(dom: Domain) -> None:
    virsh("destroy", dom.name, check=False)
    shutil.rmtree(dom.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def private_domain(libvirtd: None) -> Iterator[Domain]:
    dom = boot_domain("private", vmcoreinfo=False)
    yield dom
    destroy(dom)


@pytest.fixture(scope="module")
def memfd_domain(libvirtd: None) -> Iterator[Domain]:
    dom = boot_domain("memfd", vmcoreinfo=True)
    yield dom
    destroy(dom)


@pytest.fixture(params=["private", "memfd"])
def domain(request: pytest.FixtureRequest) -> Domain:
    """Each test using this runs on both domains."""
    return request.getfixturevalue(f"{request.param}_domain")  # type: ignore[no-any-return]


class DomainMount(Mount):
    """``vmcorefs mount [options] --connect URI --domain NAME DIR`` for a
    ``with`` block: :class:`Mount`'s command line, whose last argument
    before the directory (the socket there) is the domain's name here."""

    def __init__(self, dom: Domain, *options: str) -> None:
        super().__init__(None, *options, "--connect", URI, "--domain", socket=dom.name)  # type: ignore[arg-type]
        self.dom = dom


def _loads(elf: ELFFile) -> list[tuple[int, int, int, int]]:
    """(p_paddr, p_memsz, p_offset, p_vaddr) of every PT_LOAD."""
    return [(s["p_paddr"], s["p_memsz"], s["p_offset"], s["p_vaddr"])
            for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]


def _notes(f: BinaryIO, elf: ELFFile) -> list[Note]:
    (seg,) = [s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"]
    f.seek(seg["p_offset"])
    return parse_notes(f.read(seg["p_filesz"]))


def _compare_loads(ours: BinaryIO, theirs: BinaryIO) -> None:
    """Same PT_LOAD set (p_paddr, p_memsz, p_vaddr) and every byte equal."""
    lo, lt = _loads(ELFFile(ours)), _loads(ELFFile(theirs))
    assert [(p, n, v) for p, n, _, v in lo] == [(p, n, v) for p, n, _, v in lt]
    assert load_mismatches(ours, theirs, [(p, n, oo, ot) for (p, n, oo, _), (_, _, ot, _) in zip(lo, lt)]) == []


def test_paused_vmcore_equals_libvirt_dump(domain: Domain, tmp_path: Path) -> None:
    """With the domain paused (virsh suspend), vmcore's PT_LOADs equal libvirt's
    own memory-only ELF dump byte for byte, and the vCPU registers
    (CORE/NT_PRSTATUS notes) are the same; VMCOREINFO too when the domain
    has the vmcoreinfo device."""
    oracle = tmp_path / "libvirt.dump"
    with DomainMount(domain) as m, domain.paused():
        with open(m.vmcore, "rb") as ours:
            virsh("dump", "--memory-only", "--format", "elf", domain.name, str(oracle))
            assert domain.state() == "paused"
            with open(oracle, "rb") as theirs:
                e_ours, e_theirs = ELFFile(ours), ELFFile(theirs)
                assert e_ours["e_machine"] == e_theirs["e_machine"] == "EM_X86_64"
                assert e_ours["e_ident"] == e_theirs["e_ident"]
                assert e_ours["e_flags"] == e_theirs["e_flags"]
                n_ours, n_theirs = _notes(ours, e_ours), _notes(theirs, e_theirs)
                prstatus = [n for n in n_theirs if n.name == "CORE" and n.type == NT_PRSTATUS]
                assert len(prstatus) == 2
                assert [n for n in n_ours if n.name == "CORE"] == prstatus
                assert len([n for n in n_ours if n.name == "QEMU"]) == 2
                theirs_vci = [n for n in n_theirs if n.name == "VMCOREINFO"]
                (ours_vci,) = [n for n in n_ours if n.name == "VMCOREINFO"]  # from guest RAM
                if theirs_vci:
                    assert ours_vci == theirs_vci[0]
                _compare_loads(ours, theirs)


def test_drgn_kallsyms(domain: Domain) -> None:
    """drgn without debuginfo (kallsyms through VMCOREINFO) on the live core."""
    with DomainMount(domain) as m:
        r = subprocess.run([sys.executable, "-c", DRGN_KALLSYMS, str(m.vmcore), "jiffies"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        banner = r.stdout.splitlines()[0]
        assert banner.startswith("Linux version ") and DEBIAN12.release in banner


def test_info(domain: Domain) -> None:
    r = run_vmcorefs("info", "--domain", domain.name, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["libvirt"] == {"uri": URI, "domain": domain.name, "uuid": domain.uuid}
    assert info["vcpus"] == 2 and info["status"] == "running"
    assert info["vmcoreinfo"]["OSRELEASE"] == DEBIAN12.release
    assert info["vmcoreinfo_origin"].startswith("guest RAM at GPA")
    access = {m["access"] for m in info["memory"] if m["name"] == "pc.ram"}
    assert access == ({"shared"} if domain.memory == "memfd" else {"procmem"})
    # By UUID, and the human form.
    r = run_vmcorefs("info", "--connect", URI, "--domain", domain.uuid)
    assert r.returncode == 0, r.stderr
    assert f"libvirt      {URI} domain {domain.name} {domain.uuid}" in r.stdout
    # Passthrough taints the domain; libvirt logs it.
    log = Path(f"/var/log/libvirt/qemu/{domain.name}.log")
    assert "tainted: custom-monitor" in log.read_text(errors="replace")


def test_freeze_through_libvirt(private_domain: Domain) -> None:
    """--freeze: libvirt shows the domain paused while vmcore is open, running after."""
    dom = private_domain
    with DomainMount(dom, "--freeze") as m:
        assert dom.state() == "running"
        with open(m.vmcore, "rb") as f:
            f.read(4096)
            assert dom.state() == "paused"
        wait_for(lambda: dom.state() == "running", 30, "domain running again")
        # A domain paused by the user stays paused.
        with dom.paused():
            with open(m.vmcore, "rb") as f:
                f.read(4096)
            assert dom.state() == "paused"
        assert dom.state() == "running"


def test_freeze_watchdog_resumes_through_libvirt(private_domain: Domain) -> None:
    """The daemon killed (SIGKILL of its session) while --freeze holds the
    domain paused: its watchdog resumes the domain through libvirt."""
    dom = private_domain
    m = DomainMount(dom, "--freeze").__enter__()
    try:
        assert m.daemon_pid is not None
        f = open(m.vmcore, "rb")
        try:
            f.read(4096)
            assert dom.state() == "paused"
            os.killpg(os.getpgid(m.daemon_pid), signal.SIGKILL)
            wait_for(lambda: dom.state() == "running", 60, "domain resumed by the watchdog")
        finally:
            with contextlib.suppress(OSError):
                f.close()
    finally:
        m.close()


def test_bad_input(private_domain: Domain, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cases = [
        (["info", "--domain", "no-such-domain-vmcorefs"], 2, "no domain 'no-such-domain-vmcorefs'"),
        (["mount", "--domain", "no-such-domain-vmcorefs", str(mnt)], 2, "no domain"),
        (["info", "--connect", "qemu:///nowhere", "--domain", "x"], 1, "cannot connect to qemu:///nowhere"),
        (["info", "/tmp/x.sock", "--domain", private_domain.name], 2, "not both"),
        (["info", "--connect", URI], 2, "--connect needs --domain"),
        (["info"], 2, "give QMP_SOCKET or --domain"),
        (["mount", "--domain", private_domain.name], 2, "MOUNTPOINT"),
        (["mount", "--domain", private_domain.name, str(tmp_path / "nope")], 2, "mountpoint does not exist"),
    ]
    for args, code, text in cases:
        r = run_vmcorefs(*args)
        assert (r.returncode, r.stdout) == (code, ""), (args, r.stderr)
        assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert not is_mounted(mnt)


def test_domain_not_running(libvirtd: None, tmp_path: Path) -> None:
    """A defined but inactive domain: exit 2, one line, nothing mounted."""
    name = f"vmcorefs-test-inactive-{os.getpid()}"
    xml = tmp_path / "inactive.xml"
    xml.write_text(_domain_xml(name, str(uuid.uuid4()), tmp_path, "private", False))
    virsh("define", str(xml))
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        for args in (["info", "--domain", name], ["mount", "--domain", name, str(mnt)]):
            r = run_vmcorefs(*args)
            assert r.returncode == 2, r.stderr
            assert "is not running" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not is_mounted(mnt)
    finally:
        virsh("undefine", name, check=False)


def test_libvirtd_restart_while_mounted(private_domain: Domain) -> None:
    """libvirtd restarts under a mount (an upgrade): the next open connects again."""
    with DomainMount(private_domain, "--freeze") as m:
        with open(m.vmcore, "rb") as f:
            assert f.read(4) == b"\x7fELF"
        # FUSE's release (which resumes) runs after close() returns.
        wait_for(lambda: private_domain.state() == "running", 30, "domain running again")
        restart_libvirtd()
        with open(m.vmcore, "rb") as f:
            assert f.read(4) == b"\x7fELF"
            assert private_domain.state() == "paused"  # --freeze through the new connection
        wait_for(lambda: private_domain.state() == "running", 30, "domain running again")


def test_domain_destroyed_while_mounted(libvirtd: None) -> None:
    """The domain ends under a mount: the daemon unmounts and exits."""
    dom = boot_domain("private", vmcoreinfo=False, tag="-gone")
    try:
        with DomainMount(dom) as m:
            pid = m.daemon_pid
            assert pid is not None
            with open(m.vmcore, "rb") as f:
                f.read(4096)
                virsh("destroy", dom.name)
                wait_for(lambda: not is_mounted(m.path), 60, "unmount after the domain ended")
            wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 60, "daemon exit")
    finally:
        destroy(dom)
