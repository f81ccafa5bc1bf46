"""The vmcorefs exception hierarchy (drawn in the package docstring).

Each error renders as one line for users (``str(err)``) and carries the
context needed to act on it: the QMP command that failed, the guest-physical
address that could not be read, or the fix for a missing permission.
"""

from __future__ import annotations

import errno
import os


class VmcorefsError(Exception):
    """Root of every error vmcorefs raises on purpose (never raised itself)."""

    exit_code = 1


class UsageError(VmcorefsError):
    """Bad input from the user: paths, options, mountpoints."""

    exit_code = 2


def stat_or_usage_error(path: str, missing: str) -> "os.stat_result":
    """``os.stat(path)``; a :class:`UsageError` naming ``path`` when it fails
    (``missing`` says what is not there, e.g. ``no such QMP socket``)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: {missing}") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:  # a FUSE daemon died here
            raise UsageError(f"{path}: stale FUSE mount (run 'fusermount3 -u {path}')") from None
        raise UsageError(f"{path}: {e.strerror}") from None


class NotQMPError(UsageError):
    """The socket is not a QMP monitor (no QMP greeting)."""


class QMPError(VmcorefsError):
    """A QMP command failed; ``command`` names it."""

    def __init__(self, message: str, command: str | None = None) -> None:
        self.command = command
        super().__init__(f"QMP {command}: {message}" if command else message)


class QMPTimeoutError(QMPError):
    """QEMU did not answer within the timeout (stopped or hung)."""


class MonitorBusyError(QMPError):
    """The QMP monitor already serves another client (QMP allows one)."""


class QEMUGoneError(VmcorefsError):
    """QEMU exited: the monitor connection was lost, or its memory vanished
    (``/proc/PID/mem``).  ``command`` names the QMP command that found out,
    if one did."""

    def __init__(self, message: str, command: str | None = None) -> None:
        self.command = command
        super().__init__(f"QMP {command}: {message}" if command else message)


class GuestMemoryError(VmcorefsError):
    """Guest memory could not be read; ``gpa`` is the guest-physical address."""

    def __init__(self, message: str, gpa: int | None = None) -> None:
        self.gpa = gpa
        super().__init__(f"{message} at guest-physical {gpa:#x}" if gpa is not None else message)


class AccessError(VmcorefsError):
    """No method can reach the guest's memory; ``fix`` says what would."""

    def __init__(self, message: str, fix: str) -> None:
        self.fix = fix
        super().__init__(f"{message} ({fix})")


class FormatError(VmcorefsError):
    """Malformed data from QEMU or the guest (ELF, notes, mtree, VMCOREINFO)."""


class NoSuchFileError(VmcorefsError):
    """A live core has no file ``name`` (now): e.g. no ``kcore`` without a
    page-table root, no ``vmcoreinfo`` when the guest published none."""

    def __init__(self, message: str, name: str) -> None:
        self.name = name
        super().__init__(f"{name}: {message}")


class MountError(VmcorefsError):
    """The FUSE mount could not be made or taken over (``/dev/fuse``, libfuse,
    the native read path)."""


class LibvirtError(VmcorefsError):
    """libvirt failed: libvirtd unreachable, the Python binding missing, an
    API call refused; ``call`` names the libvirt call."""

    def __init__(self, message: str, call: str | None = None) -> None:
        self.call = call
        super().__init__(f"libvirt {call}: {message}" if call else f"libvirt: {message}")
