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
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

import pytest
from elftools.elf.elffile import ELFFile

from vmcorefs.core.notes import Note, parse_notes
from vmcorefs.testing import (
    CRASH9,
    DEBIAN12,
    DRGN_KALLSYMS,
    KERNEL_SPACE,
    Mount,
    crash_sections,
    drgn_tasks,
    gdb_on_kcore,
    gdb_threads,
    is_mounted,
    load_mismatches,
    makedumpfile,
    require,
    run_crash,
    run_vmcorefs,
    wait_for,
)
from vmcorefs.testing.libvirt import (
    URI,
    Domain,
    LibvirtUnavailable,
    destroy,
    domain_xml,
    libvirtd_answers,
    restart_libvirtd,
    start_libvirtd,
    stop_libvirtd,
    virsh,
)
from vmcorefs.testing.libvirt import boot_domain as _boot

pytestmark = pytest.mark.integration
NT_PRSTATUS = 1


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    """libvirtd (and virtlogd) answering on qemu:///system; started here
    (without systemd) when needed, and then stopped at the end (the
    libvirtd of the moment: a test may restart it)."""
    require(importlib.util.find_spec("libvirt") is not None, "libvirt-python missing (pip install vmcorefs[libvirt])")
    require(DEBIAN12.missing() is None, DEBIAN12.missing() or "")
    try:
        started = start_libvirtd()
    except LibvirtUnavailable as e:
        require(False, str(e))
        raise
    try:
        yield
    finally:
        stop_libvirtd(started)


@pytest.fixture(autouse=True)
def _libvirtd_survives(libvirtd: None) -> Iterator[None]:
    """After every test libvirtd still answers (it crashes on a dump it did
    not start: vmcorefs must never run one through it)."""
    yield
    assert libvirtd_answers(), "libvirtd stopped answering"


def boot_domain(memory: str, vmcoreinfo: bool, tag: str = "", mib: int = 256) -> Domain:
    """A transient test domain named after its kind and this process."""
    return _boot(f"vmcorefs-test-{memory}{tag}-{os.getpid()}", memory, vmcoreinfo, mib)


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


def check_against_libvirt_dump(dom: Domain, vmcore: Path, oracle: Path) -> list[tuple[int, int]]:
    """``dom`` paused: ``vmcore``'s PT_LOADs equal libvirt's own memory-only
    ELF dump (written to ``oracle``) byte for byte, and the vCPU registers
    (CORE/NT_PRSTATUS notes) are the same; VMCOREINFO too when the domain
    has the vmcoreinfo device.  Returns the (p_paddr, p_memsz) of the PT_LOADs."""
    assert dom.state() == "paused"
    with open(vmcore, "rb") as ours:
        virsh("dump", "--memory-only", "--format", "elf", dom.name, str(oracle))
        assert dom.state() == "paused"
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
            return [(p, n) for p, n, _, _ in _loads(e_ours)]


def test_paused_vmcore_equals_libvirt_dump(domain: Domain, tmp_path: Path) -> None:
    """With the domain paused (virsh suspend), vmcore equals libvirt's own
    memory-only ELF dump (:func:`check_against_libvirt_dump`)."""
    with DomainMount(domain) as m, domain.paused():
        check_against_libvirt_dump(domain, m.vmcore, tmp_path / "libvirt.dump")
    oracle_removed(tmp_path)


def test_ram_above_4g_equals_libvirt_dump(libvirtd: None, tmp_path: Path) -> None:
    """A 4.5 GiB ``pc`` domain (private RAM: 3.5 GiB below the PCI hole, the
    rest from 4 GiB): paused, vmcore equals libvirt's dump byte for byte."""
    dom = boot_domain("private", vmcoreinfo=False, tag="-4g", mib=4608)
    try:
        with DomainMount(dom) as m, dom.paused():
            loads = check_against_libvirt_dump(dom, m.vmcore, tmp_path / "libvirt.dump")
        oracle_removed(tmp_path)
        assert any(paddr >= 4 << 30 for paddr, _ in loads), loads
        assert sum(size for _, size in loads) >= 4608 << 20, loads
    finally:
        destroy(dom)


def oracle_removed(directory: Path) -> None:
    """Remove libvirt's dump (guest-sized) as soon as it was compared."""
    (directory / "libvirt.dump").unlink(missing_ok=True)


def test_drgn_with_debuginfo(domain: Domain) -> None:
    """Frozen: drgn with the debug vmlinux lists the tasks and unwinds the
    task on each vCPU (the notes' registers, built from ``info registers``)."""
    require(DEBIAN12.vmlinux.exists(), f"debug vmlinux missing ({DEBIAN12.vmlinux}); run scripts/setup.sh")
    with DomainMount(domain, "--freeze") as m:
        d = drgn_tasks(m.vmcore, DEBIAN12.vmlinux)
    assert d.release == DEBIAN12.release
    assert d.tasks > 10 and d.tasks == d.threads, d
    assert sorted(c.cpu for c in d.on_cpu) == [0, 1], d
    assert all(c.frames >= 1 for c in d.on_cpu), d


def test_makedumpfile_then_crash9(domain: Domain, tmp_path: Path) -> None:
    """makedumpfile -c -d 31 of the live vmcore (frozen: one instant), then
    crash 9's ``sys`` and ``ps`` on the kdump file."""
    require(DEBIAN12.vmlinux.exists(), f"debug vmlinux missing ({DEBIAN12.vmlinux}); run scripts/setup.sh")
    out = tmp_path / "filtered.kdump"
    with DomainMount(domain, "--freeze") as m:
        makedumpfile(m.vmcore, out, "-c", "-d", "31")
    assert out.read_bytes()[:8] == b"KDUMP   "
    assert out.stat().st_size < (256 << 20) // 4
    require(CRASH9.exists(), f"crash 9 missing ({CRASH9}); run scripts/build-tools.sh crash")
    s = crash_sections(run_crash(DEBIAN12.vmlinux, out, "sys\nps", crash=CRASH9, echo=True))
    assert f"RELEASE: {DEBIAN12.release}" in s["sys"], s["sys"]
    assert re.search(r"^\s+CPUS: 2$", s["sys"], re.M), s["sys"]
    tasks = re.findall(r"^[ >]\s*(\d+)\s+\d+\s+\d+\s+[0-9a-f]+\s+[A-Z]{2}\s", s["ps"], re.M)
    assert len(tasks) > 10 and "1" in tasks, s["ps"]


def test_gdb_on_kcore(domain: Domain) -> None:
    """gdb with the debug vmlinux on kcore through gdbinit (KASLR offset
    from the VMCOREINFO found in guest RAM): the banner, one thread per vCPU."""
    require(DEBIAN12.vmlinux.exists(), f"debug vmlinux missing ({DEBIAN12.vmlinux}); run scripts/setup.sh")
    with DomainMount(domain, "--freeze") as m:
        out = gdb_on_kcore(DEBIAN12.vmlinux, m.path, "print linux_banner", "info threads")
    assert f'"Linux version {DEBIAN12.release} ' in out, out
    threads = gdb_threads(out)
    assert [n for n, _, _ in threads] == [1, 2], out
    kernel = [fn for _, pc, fn in threads if pc is None or pc >= KERNEL_SPACE]
    assert kernel and all(fn != "??" for fn in kernel), out


def test_vmcorefs_dump_domain(domain: Domain, tmp_path: Path) -> None:
    """``vmcorefs dump --domain``: of the paused domain, the same PT_LOADs
    and registers as libvirt's own dump, the domain left paused; of the
    running domain, the domain running again after; libvirtd alive."""
    out = tmp_path / "vmcorefs.elf"
    with domain.paused():
        r = run_vmcorefs("dump", "--quiet", "--domain", domain.name, str(out))
        assert r.returncode == 0, r.stderr
        assert domain.state() == "paused"
        check_against_libvirt_dump(domain, out, tmp_path / "libvirt.dump")
    oracle_removed(tmp_path)
    assert domain.state() == "running"
    r = run_vmcorefs("dump", "--force", "--connect", URI, "--domain", domain.name, str(out))
    assert r.returncode == 0, r.stderr
    assert "guest paused" in r.stderr.splitlines()[-1], r.stderr
    assert domain.state() == "running"
    assert libvirtd_answers()


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
    # Passthrough taints the domain: libvirt logs it and virsh dominfo says so
    # (what the README and docs/cookbook.md tell users).
    log = Path(f"/var/log/libvirt/qemu/{domain.name}.log")
    assert "tainted: custom-monitor" in log.read_text(errors="replace")
    assert "tainted: custom monitor control commands issued" in virsh("dominfo", domain.name).stdout


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
    xml.write_text(domain_xml(name, str(uuid.uuid4()), tmp_path, "private", False))
    virsh("define", str(xml), timeout=600)  # libvirtd may probe QEMU first: slow on a loaded host
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
