"""Build of the one native piece, vmcorefs._readpath (the rest is in pyproject.toml)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vmcorefs._readpath",
            ["src/vmcorefs/_readpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-Wno-unused-parameter",
                                "-std=gnu11"],
        )
    ]
)
