"""Unit tests of the pure core: no QEMU, no FUSE, no root.

Helpers live in ``unit_support.py`` (importable because pytest puts this
folder on sys.path; it has no ``__init__.py``).  Real QEMU 7.2 samples are
in ``data/``; ``data/capture_qemu_samples.py`` regenerates them.
"""
