"""The debuggers users run on a guest's core, run as the tests run them.

* :func:`run_crash`: crash (Debian's 8.0.2 on PATH, or :data:`CRASH9`)
  with a debug vmlinux on a core, commands on its standard input;
  :func:`crash_sections` splits its output by command.
* :func:`drgn_tasks`: drgn with the debug vmlinux: the kernel release, the
  task list, and the stack of the task on each online CPU
  (:data:`DRGN_DEBUGINFO`, run in a fresh interpreter).
* :func:`gdb_on_kcore`: gdb with the debug vmlinux on a mount's ``kcore``
  (through its ``gdbinit``), and :func:`gdb_threads` to read ``info threads``.
* :func:`makedumpfile`: makedumpfile from a core to a file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vmcorefs.testing.guests import CACHE, require

#: crash 9 as ``scripts/build-tools.sh crash`` builds it (Debian 12's crash
#: 8.0.2 misreads ``struct pid`` of current kernels and cannot unwind the
#: cloud kernels' vCPUs; see docs/cookbook.md).
CRASH9 = CACHE / "crash-9" / "bin" / "crash"


def run_crash(vmlinux: Path, core: Path, commands: str, crash: str | Path = "crash",
              timeout: float = 600, echo: bool = False) -> str:
    """``crash -s VMLINUX CORE`` fed ``commands`` (one per line) then ``quit``;
    its stdout and stderr together.  ``echo``: without ``-s``, so that crash
    prints its banner and, before each command's output, its prompt and the
    command (``crash> CMD``; see :func:`crash_sections`).  Skips (fails under
    ``CI=true``) when ``crash`` is not installed; AssertionError when it
    exits non-zero."""
    require(shutil.which(str(crash)) is not None, f"{crash} not installed (scripts/setup.sh)")
    argv = [str(crash), *([] if echo else ["-s"]), str(vmlinux), str(core)]
    r = subprocess.run(argv, input=commands + "\nquit\n", capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{crash} exited {r.returncode}: " + r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout + r.stderr


def crash_sections(out: str) -> dict[str, str]:
    """The output of ``run_crash(..., echo=True)`` by command: the text after
    each ``crash> CMD`` line, up to the next prompt."""
    parts = re.split(r"^crash> (.*)$", out, flags=re.M)
    return {cmd: text for cmd, text in zip(parts[1::2], parts[2::2])}


DRGN_DEBUGINFO = r"""
import sys, drgn
from drgn.helpers.linux.pid import for_each_task
from drgn.helpers.linux.cpumask import for_each_online_cpu
from drgn.helpers.linux.sched import cpu_curr
prog = drgn.Program()
prog.set_core_dump(sys.argv[1])
prog.load_debug_info([sys.argv[2]])
print("release", prog["init_uts_ns"].name.release.string_().decode())
print("tasks", len(list(for_each_task(prog))), "threads", len(list(prog.threads())))
for cpu in for_each_online_cpu(prog):
    task = cpu_curr(prog, cpu)
    trace = prog.stack_trace(task)
    print("cpu", cpu, task.comm.string_().decode(), "frames", len(trace), trace[0].name, trace[len(trace) - 1].name,
          hex(trace[0].pc))
    print(trace)
"""


@dataclass(frozen=True)
class OnCpu:
    """The task on one CPU and drgn's unwind of it: ``innermost`` and
    ``outermost`` are frame names (``0x...`` when unsymbolised), ``pc`` the
    innermost frame's, ``trace`` drgn's whole stack trace as it prints it."""

    cpu: int
    comm: str
    frames: int
    innermost: str
    outermost: str
    pc: int
    trace: str


@dataclass(frozen=True)
class DrgnTasks:
    """What :data:`DRGN_DEBUGINFO` printed: ``tasks`` from the kernel's task
    list (``for_each_task``), ``threads`` from drgn's own thread list."""

    release: str
    tasks: int
    threads: int
    on_cpu: list[OnCpu]


def drgn_tasks(core: Path, vmlinux: Path, timeout: float = 300) -> DrgnTasks:
    """Run :data:`DRGN_DEBUGINFO` on ``core``; AssertionError if drgn fails."""
    r = subprocess.run([sys.executable, "-c", DRGN_DEBUGINFO, str(core), str(vmlinux)],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    release = re.search(r"^release (\S+)$", r.stdout, re.M)
    counts = re.search(r"^tasks (\d+) threads (\d+)$", r.stdout, re.M)
    assert release and counts, r.stdout
    on_cpu = []
    for block in re.split(r"^(?=cpu \d+ )", r.stdout, flags=re.M)[1:]:
        m = re.match(r"cpu (\d+) (\S+) frames (\d+) (\S+) (\S+) (0x[0-9a-f]+)\n", block)
        assert m, r.stdout
        c, comm, n, inner, outer, pc = m.groups()
        on_cpu.append(OnCpu(int(c), comm, int(n), inner, outer, int(pc, 16), block[m.end():]))
    return DrgnTasks(release[1], int(counts[1]), int(counts[2]), on_cpu)


#: Lowest kernel-space address on x86_64 (4-level paging's canonical upper half).
KERNEL_SPACE = 0xFFFF800000000000


def gdb_on_kcore(vmlinux: Path, mountpoint: Path, *commands: str, timeout: float = 600) -> str:
    """``gdb -batch VMLINUX -x MOUNT/gdbinit -ex CMD...``: its stdout.
    AssertionError when gdb exits non-zero."""
    require(shutil.which("gdb") is not None, "gdb not installed")
    ex = [a for c in commands for a in ("-ex", c)]
    r = subprocess.run(["gdb", "-q", "-batch", str(vmlinux), "-x", str(mountpoint / "gdbinit"), *ex],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def gdb_threads(out: str) -> list[tuple[int, int | None, str]]:
    """``info threads`` of gdb's output: (number, PC or None, function) per
    thread (one per vCPU).  gdb leaves out ``0x... in`` when the PC is at
    the first instruction of a source line: then PC is None (in the kernel,
    where the debug info has lines)."""
    return [(int(n), int(pc, 16) if pc else None, fn) for n, pc, fn
            in re.findall(r"^\*?\s+(\d+)\s+LWP \d+\s+(?:(0x[0-9a-f]+) in )?(\S+) \(", out, re.M)]


def makedumpfile(core: Path, out: Path, *options: str, timeout: float = 600) -> str:
    """``makedumpfile OPTIONS... CORE OUT`` (e.g. ``-c -d 31``, or
    ``--dump-dmesg``): its stdout and stderr.  AssertionError when it fails."""
    require(shutil.which("makedumpfile") is not None, "makedumpfile not installed")
    r = subprocess.run(["makedumpfile", *options, str(core), str(out)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr
