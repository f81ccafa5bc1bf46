"""x86 vCPU registers and ELF notes from the monitor, without ``dump-guest-memory``.

Under libvirt vmcorefs must not run ``dump-guest-memory`` (libvirtd 9.0
crashes on the DUMP_COMPLETED event of a dump it did not start), so the
notes QEMU's dump would carry are built here from HMP ``info registers -a``
(through QMP ``human-monitor-command``) by :mod:`vmcorefs.core.x86_notes`;
the module docstring there lists the fields the text does not give
(``kernel_gs_base``, written as 0) and how segment flags are rebuilt.

Cost: one QMP round trip for ``info registers -a`` (about 2 KiB of text per
vCPU; well under a millisecond of QEMU time per vCPU under TCG), plus one
``query-kvm`` when the caller does not say whether the guest runs under
TCG (cache :func:`uses_tcg`'s answer: it cannot change).  Under KVM QEMU
fetches each vCPU's registers from the kernel for ``info registers`` as
``dump-guest-memory`` does (one ``run_on_cpu`` per vCPU).

Consistency: ``info registers`` does not stop the guest.  On a running
guest each vCPU's values are read while it runs (TCG: a line may be torn;
KVM: each vCPU at its own instant); pause the guest (``stop``/``cont``)
around the call for one instant, which is what a dump gets.  Unlike
``dump-guest-memory`` this emits no STOP/RESUME/DUMP_COMPLETED events.
"""

from __future__ import annotations

from typing import Sequence

from vmcorefs.core.x86_notes import X86VCPU, build_x86_notes, parse_info_registers
from vmcorefs.errors import FormatError
from vmcorefs.qemu.monitor import Monitor

INFO_REGISTERS = "info registers -a"


async def read_x86_vcpus(monitor: Monitor) -> list[X86VCPU]:
    """Every vCPU's registers, in QEMU's vCPU order (``CPU_FOREACH``).

    Raises :class:`QMPError` (and subclasses) when the command fails, and
    :class:`FormatError` naming the command when QEMU's answer is not x86
    ``info registers -a`` text (another target, an HMP error message).
    """
    text = await monitor.hmp(INFO_REGISTERS)
    try:
        return parse_info_registers(text)
    except FormatError as e:
        raise FormatError(f"HMP {INFO_REGISTERS}: {e}") from None


async def uses_tcg(monitor: Monitor) -> bool:
    """Whether QEMU runs the guest with TCG (``query-kvm``: KVM not enabled).

    On Linux hosts the alternatives to KVM are TCG and Xen; it decides how
    segment flags are rebuilt (see :mod:`vmcorefs.core.x86_notes`).
    """
    answer = await monitor.execute("query-kvm")
    return not (isinstance(answer, dict) and answer.get("enabled") is True)


async def x86_notes(monitor: Monitor, vmcoreinfo: bytes | str | None, *, tcg: bool | None = None,
                    kernel_gs_base: Sequence[int] | None = None) -> bytes:
    """The PT_NOTE bytes QEMU's ``dump-guest-memory paging=false`` would
    write now: per vCPU ``CORE``/NT_PRSTATUS, per vCPU ``QEMU``
    (QEMUCPUState), then ``VMCOREINFO`` when ``vmcoreinfo`` (the note's desc,
    the guest's KEY=VALUE text, as bytes or ASCII ``str``) is given.

    ``tcg``: None asks QEMU (one more round trip, see :func:`uses_tcg`).
    ``kernel_gs_base``: per-vCPU values when the caller knows them, else 0.
    Errors as :func:`read_x86_vcpus`.
    """
    cpus = await read_x86_vcpus(monitor)
    if tcg is None:
        tcg = await uses_tcg(monitor)
    return build_x86_notes(cpus, vmcoreinfo, tcg=tcg, kernel_gs_base=kernel_gs_base)
