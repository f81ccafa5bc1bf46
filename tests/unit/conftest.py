"""Unit tests of the pure core: no QEMU, no FUSE, no root.

Helpers live in ``unit_support.py`` (importable because pytest puts this
folder on sys.path; it has no ``__init__.py``).  Real QEMU 7.2 samples are
in ``data/``; ``data/capture_qemu_samples.py`` regenerates them.
"""

import os

from hypothesis import settings

import vmcorefs

# ``make sanitize``: the ASan+UBSan build of vmcorefs._readpath (the read
# path's engine and the dump's copier), found before anything imports it.
SANITIZED = os.environ.get("VMCOREFS_READPATH_BUILD")
if SANITIZED:
    vmcorefs.__path__.insert(0, SANITIZED)

# No per-example wall-clock deadline (hypothesis' default is 200 ms): on a
# busy machine a slow example is not a failure.  Tests may still set their own.
settings.register_profile("vmcorefs", deadline=None)
settings.load_profile("vmcorefs")
