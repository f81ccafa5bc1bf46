"""vmcorefs: /proc/kcore for a QEMU guest.

``vmcorefs mount QMP_SOCKET MNT`` makes ``MNT/vmcore`` an ELF core file of the
live guest, served on demand through FUSE from the guest's memory.

Layers (dependencies point downwards only)::

    cli        argument parsing, daemonisation, one-line errors and exit codes
    fs         pyfuse3 adapter: inodes, directories, errno -- no decisions
    readpath   (adapter) the native FUSE_READ path, _readpath.c: layouts in,
               replies spliced or copied from guest memory, EIO when QEMU is gone
    live       the live core of one VM, no FUSE: file registry, snapshots per
               open, --freeze refcount, page-cache rules, QEMU-gone state
    qemu       QMP (qemu.qmp), guest discovery, snapshots, memory backends (pread)
    core       pure: ELF layout, notes, memory map, page-table walk (no I/O)

Every error vmcorefs raises derives from :class:`VmcorefsError`
(see :mod:`vmcorefs.errors`)::

    VmcorefsError                      exit 1 unless said otherwise
    +-- UsageError                     exit 2: bad paths, bad options
    |   +-- NotQMPError                socket answers but is not a QMP monitor
    +-- QMPError                       a QMP command failed (.command)
    |   +-- QMPTimeoutError            no answer within the timeout
    |   +-- MonitorBusyError           monitor already has a client
    +-- QEMUGoneError                  QEMU exited: monitor lost or its memory gone (.command)
    +-- GuestMemoryError               guest memory could not be read (.gpa)
    +-- AccessError                    no way to reach guest memory (.fix)
    +-- FormatError                    malformed data from QEMU or the guest
    +-- NoSuchFileError                a live core has no such file now (.name)
    +-- MountError                     the FUSE mount could not be made or taken over
    +-- LibvirtError                   libvirtd unreachable, binding missing, a call refused (.call)

``VmcorefsError`` itself is never raised.
"""

from vmcorefs.errors import (
    AccessError,
    FormatError,
    GuestMemoryError,
    LibvirtError,
    MonitorBusyError,
    MountError,
    NoSuchFileError,
    NotQMPError,
    QEMUGoneError,
    QMPError,
    QMPTimeoutError,
    UsageError,
    VmcorefsError,
)

__version__ = "0.1.0"

__all__ = [
    "AccessError",
    "FormatError",
    "GuestMemoryError",
    "LibvirtError",
    "MonitorBusyError",
    "MountError",
    "NoSuchFileError",
    "NotQMPError",
    "QEMUGoneError",
    "QMPError",
    "QMPTimeoutError",
    "UsageError",
    "VmcorefsError",
]
