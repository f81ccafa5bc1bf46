"""``vmcorefs mount --all``: every running libvirt domain as MNT/NAME/ (real libvirtd).

Domains come and go with libvirt's lifecycle events; a handle open on a
domain that went away reads EIO; ``--freeze`` pauses only the domain whose
file is open; libvirtd answers after every test (``_libvirtd_survives``).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from test_libvirt import URI, Domain, _libvirtd_survives, boot_domain, destroy, libvirtd  # noqa: F401

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
