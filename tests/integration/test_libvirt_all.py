"""``vmcorefs mount --all``: every running libvirt domain as MNT/NAME/ (real libvirtd).

Domains come and go with libvirt's lifecycle events; a handle open on a
domain that went away reads EIO; ``--freeze`` pauses only the domain whose
file is open; libvirtd answers after every test (``_libvirtd_survives``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO, Iterator

import pytest
from test_libvirt import (  # noqa: F401
    URI,
    Domain,
    _libvirtd_survives,
    boot_domain,
    check_against_libvirt_dump,
    destroy,
    libvirtd,
    oracle_removed,
)

from vmcorefs.testing import DRGN_KALLSYMS, Mount, wait_for


@pytest.fixture(scope="module")
def two_domains(libvirtd: None) -> Iterator[tuple[Domain, Domain]]:  # noqa: F811
    a = boot_domain("private", vmcoreinfo=False, tag="-all")
    try:
        b = boot_domain("memfd", vmcoreinfo=True, tag="-all")
    except BaseException:
        destroy(a)
        raise
    yield a, b
    destroy(a)
    destroy(b)


@pytest.fixture(scope="module")
def second_private(libvirtd: None) -> Iterator[Domain]:  # noqa: F811
    """Another domain with libvirt's default private RAM (another QEMU process)."""
    dom = boot_domain("private", vmcoreinfo=True, tag="-all2")
    yield dom
    destroy(dom)


class AllMount(Mount):
    """``vmcorefs mount --connect URI --all [options] DIR``."""

    def __init__(self, *options: str) -> None:
        # Mount's command line ends "SOCKET DIR": here "--all DIR".
        super().__init__(None, *options, "--connect", URI, socket="--all")  # type: ignore[arg-type]


def test_all_domains_listed_and_readable(two_domains: tuple[Domain, Domain]) -> None:
    a, b = two_domains
    with AllMount() as m:
        names = set(os.listdir(m.path))
        assert {a.name, b.name} <= names
        for dom in (a, b):
            files = sorted(os.listdir(m.path / dom.name))
            assert {"vmcore", "pmem", "vmcoreinfo", "kcore", "gdbinit"} <= set(files), files
            with open(m.path / dom.name / "vmcore", "rb") as f:
                assert f.read(4) == b"\x7fELF"
        r = subprocess.run([sys.executable, "-c", DRGN_KALLSYMS, str(m.path / a.name / "vmcore")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.startswith("Linux version"), r.stderr


def test_domains_come_and_go_while_mounted(two_domains: tuple[Domain, Domain]) -> None:
    with AllMount() as m:
        started = time.monotonic()
        c = boot_domain("private", vmcoreinfo=True, tag="-late")
        try:
            wait_for(lambda: (m.path / c.name).is_dir(), 60, f"{c.name} in the mount")
            print(f"{c.name} listed {time.monotonic() - started:.1f} s after virsh create (boot included)")
            fd = os.open(m.path / c.name / "vmcore", os.O_RDONLY)
            try:
                assert os.pread(fd, 4, 0) == b"\x7fELF"
                subprocess.run(["virsh", "-c", URI, "destroy", c.name], check=True, capture_output=True)
                wait_for(lambda: not (m.path / c.name).exists(), 60, f"{c.name} gone from the mount")
                with pytest.raises(OSError) as e:
                    os.pread(fd, 1 << 20, 4096)
                assert e.value.errno == errno.EIO
            finally:
                os.close(fd)
        finally:
            destroy(c)
        # The others are still there and readable.
        a, b = two_domains
        with open(m.path / b.name / "pmem", "rb") as f:
            assert len(f.read(4096)) == 4096


def test_freeze_pauses_only_the_domain_opened(two_domains: tuple[Domain, Domain]) -> None:
    a, b = two_domains
    with AllMount("--freeze") as m:
        with open(m.path / a.name / "vmcore", "rb") as f:
            f.read(4096)
            assert a.state() == "paused"
            assert b.state() == "running"
        wait_for(lambda: a.state() == "running", 30, f"{a.name} resumed")


def test_all_refuses_a_socket_or_domain(tmp_path: Path) -> None:
    from vmcorefs.testing import run_vmcorefs

    r = run_vmcorefs("mount", "--all", "--domain", "x", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--all" in r.stderr


def test_each_domain_read_from_its_own_qemu(two_domains: tuple[Domain, Domain], second_private: Domain,
                                            tmp_path: Path) -> None:
    """Two domains with private RAM in one mount: each paused domain's vmcore
    equals its own libvirt dump byte for byte, read natively from its own
    QEMU (pages that hold no data spliced as zeros: its pagemap)."""
    a, c = two_domains[0], second_private
    with AllMount() as m:
        for dom in (a, c):
            before = m.stats()
            with dom.paused():
                check_against_libvirt_dump(dom, m.path / dom.name / "vmcore", tmp_path / "libvirt.dump")
            oracle_removed(tmp_path)
            after = m.stats()
            # Headers alone are one spliced reply; without the domain's own
            # pagemap no private RAM would be (each 1 MiB reply copied).
            spliced = after["spliced"] - before["spliced"]
            print(f"{dom.name}: {spliced} replies spliced, {after['copied'] - before['copied']} copied")
            assert spliced >= 16, (dom.name, before, after)


def test_freeze_watchdog_under_all(two_domains: tuple[Domain, Domain], second_private: Domain) -> None:
    """--all --freeze, the daemon SIGKILLed while it holds one domain paused
    (its vmcore open): that domain's watchdog resumes it through libvirt; a
    domain never opened is untouched; one the user had paused (its vmcore
    open too) stays paused."""
    a, b = two_domains
    user_paused = second_private
    m = AllMount("--freeze").__enter__()
    try:
        assert m.daemon_pid is not None
        subprocess.run(["virsh", "-c", URI, "suspend", user_paused.name], check=True, capture_output=True)
        try:
            with contextlib.ExitStack() as handles:
                for dom in (a, user_paused):
                    f = open(m.path / dom.name / "vmcore", "rb")
                    handles.callback(_close_quietly, f)  # the mount is dead by then
                    f.read(4096)
                assert a.state() == "paused"
                assert b.state() == "running"
                os.killpg(os.getpgid(m.daemon_pid), signal.SIGKILL)
                wait_for(lambda: a.state() == "running", 60, f"{a.name} resumed by its watchdog")
            assert b.state() == "running"
            assert user_paused.state() == "paused"
        finally:
            subprocess.run(["virsh", "-c", URI, "resume", user_paused.name], check=False, capture_output=True)
    finally:
        m.close()


def _close_quietly(f: BinaryIO) -> None:
    with contextlib.suppress(OSError):
        f.close()
