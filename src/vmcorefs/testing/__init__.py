"""Real QEMU guests and real vmcorefs mounts, for the tests, the benchmarks and the demo.

Not part of vmcorefs itself (nothing in cli, fs, qemu or core imports it).
Guests need the kernels of ``scripts/build-guest.sh`` (in ``$VMCOREFS_CACHE``,
default /var/cache/vmcorefs) and QEMU; mounts need FUSE and root.

* :mod:`~vmcorefs.testing.guests`: :class:`GuestSpec` (what to boot: QEMU,
  kernel, machine, memory kind and size, vCPUs, vmcoreinfo, console
  socket, extra args), :class:`QemuGuest` (the running QEMU, its two
  monitors, QMP helpers, typing on the console),
  :func:`require` (skip, or fail under ``CI=true``).
* :mod:`~vmcorefs.testing.mounts`: :class:`Mount` (``vmcorefs mount`` in a
  ``with`` block), :func:`run_vmcorefs`, :func:`spawn_vmcorefs`,
  :func:`is_mounted`, :func:`unmount`, :func:`wait_for`.
* :mod:`~vmcorefs.testing.probes`: the drgn kallsyms program, VMCOREINFO
  arithmetic (printk head), the page cache a test brought in, an x86 guest
  paused with a vCPU in user mode.
* :mod:`~vmcorefs.testing.tools`: crash (Debian's, or :data:`CRASH9`),
  drgn with the debug vmlinux, gdb on kcore, makedumpfile, as the tests run them.

``python -m vmcorefs.testing boot|drgn-kallsyms|printk-head`` serves
shell scripts (``scripts/demo.sh``).
"""

from vmcorefs.testing.guests import (
    BACKPORTS,
    CACHE,
    DEBIAN11,
    DEBIAN12,
    QEMU10,
    SYSTEM_QEMU,
    GuestSpec,
    KernelAssets,
    Qemu,
    QemuGuest,
    Unavailable,
    close_all,
    require,
)
from vmcorefs.testing.mounts import (
    SRC,
    VMCOREFS,
    Mount,
    daemon_pid,
    is_mounted,
    run_vmcorefs,
    spawn_vmcorefs,
    unmount,
    unmount_and_wait,
    wait_for,
    wait_mounted,
)
from vmcorefs.testing.probes import (
    BUSY_LOOP,
    pause_with_a_user_vcpu,
    load_mismatches,
    DRGN_KALLSYMS,
    DRGN_KALLSYMS_QEMU,
    kernel_image_phys,
    printk_head_addr,
    memory_cgroup,
    printk_head_id,
    vmcoreinfo_dict,
)
from vmcorefs.testing.tools import (
    CRASH9,
    DRGN_DEBUGINFO,
    KERNEL_SPACE,
    DrgnTasks,
    OnCpu,
    crash_sections,
    drgn_tasks,
    gdb_on_kcore,
    gdb_threads,
    makedumpfile,
    run_crash,
)

__all__ = [
    "load_mismatches",
    "BACKPORTS", "CACHE", "DEBIAN11", "DEBIAN12", "QEMU10", "SYSTEM_QEMU", "GuestSpec", "KernelAssets", "Qemu",
    "QemuGuest", "Unavailable", "close_all", "require",
    "SRC", "VMCOREFS", "Mount", "daemon_pid", "is_mounted", "run_vmcorefs", "spawn_vmcorefs", "unmount",
    "unmount_and_wait", "wait_for", "wait_mounted",
    "DRGN_KALLSYMS", "DRGN_KALLSYMS_QEMU", "kernel_image_phys", "printk_head_addr", "printk_head_id",
    "memory_cgroup", "vmcoreinfo_dict", "BUSY_LOOP", "pause_with_a_user_vcpu",
    "CRASH9", "DRGN_DEBUGINFO", "KERNEL_SPACE", "DrgnTasks", "OnCpu", "crash_sections", "drgn_tasks",
    "gdb_on_kcore", "gdb_threads", "makedumpfile", "run_crash",
]
