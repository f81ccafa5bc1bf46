"""Every recipe of docs/cookbook.md, run as written against a live guest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from vmcorefs.testing import CRASH9, DEBIAN12, SRC, Mount, QemuGuest, require

pytestmark = pytest.mark.integration
COOKBOOK = Path(__file__).resolve().parents[2] / "docs" / "cookbook.md"


def _recipes() -> list[tuple[str, str]]:
    recipes, section = [], "intro"
    for m in re.finditer(r"^## ([^\n]+)$|^```sh\n(.*?)^```", COOKBOOK.read_text(), re.M | re.S):
        if m.group(1):
            section = m.group(1)
        else:
            recipes.append((section, m.group(2)))
    return recipes


RECIPES = _recipes()


def test_cookbook_has_recipes() -> None:
    sections = {s for s, _ in RECIPES}
    for tool in ("crash", "drgn", "gdb", "makedumpfile", "libkdumpfile"):
        assert any(tool in s for s in sections), tool


@pytest.fixture(scope="module")
def mounted(memfd_guest: QemuGuest) -> Iterator[Mount]:
    with Mount(memfd_guest) as m:
        yield m


@pytest.mark.parametrize("section,script", RECIPES, ids=[f"{i}-{s.split()[0]}" for i, (s, _) in enumerate(RECIPES)])
def test_recipe(section: str, script: str, mounted: Mount, tmp_path: Path) -> None:
    vmlinux = DEBIAN12.vmlinux
    require(vmlinux.exists(), "debug vmlinux missing; run scripts/build-guest.sh --dbg")
    # The recipes' crash is crash 9 (Debian 12's 8.0.2 cannot list 6.1's tasks).
    if re.search(r"^crash |\| crash ", script, re.M):
        require(CRASH9.exists(), f"crash 9 missing ({CRASH9}); run scripts/build-tools.sh crash")
    env = dict(os.environ, SOCK=mounted.socket, MNT=str(mounted.path), VMLINUX=str(vmlinux), OUT=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}:{CRASH9.parent}:{os.environ['PATH']}", PYTHONPATH=str(SRC))
    # The mount holds the guest's first monitor; `vmcorefs info` in a recipe
    # talks to the second, which the test's own QMP client lets go of here.
    env["SOCK"] = mounted.guest.own_qmp_path
    mounted.guest.release_qmp()
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{section}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    for want in re.findall(r"^# expect: (.+)$", script, re.M):
        assert want in r.stdout + r.stderr, f"{section}: {want!r} not in output:\n{r.stdout[-3000:]}"
