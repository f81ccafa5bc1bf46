#!/usr/bin/env bash
# Set-up from a fresh Debian 12 machine, as root: system packages, the Python
# virtual environment, and the guest assets (kernel + busybox initramfs).
# Idempotent: a second run only checks what is already there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}

apt_packages=(
  qemu-system-x86 qemu-utils        # the guests (TCG) and QEMU's own dump as oracle
  fuse3 libfuse3-dev pkg-config gcc python3-dev  # FUSE and what pyfuse3 compiles against
  busybox-static cpio kmod          # the guest initramfs
  binutils elfutils                 # readelf, eu-readelf
  makedumpfile crash gdb            # the tools users run on the core
  python3-libkdumpfile              # libkdumpfile (system python3) for its test
  clang libclang-rt-14-dev          # the read path's fuzzer (libFuzzer) and sanitizers: make fuzz, make sanitize
  xz-utils                          # the 6.12 guest's compressed qemu_fw_cfg module
  # --- libvirt: vmcorefs mount --domain (tests/integration/test_libvirt.py) ---
  # libvirtd/virtlogd (the test starts them without systemd), virsh, and the
  # headers the venv's libvirt-python (the [libvirt] extra) builds against.
  libvirt-daemon-system libvirt-clients libvirt-dev
  # --- end libvirt ---
  # --- arm64 guests (issue 14): qemu-system-aarch64 and gdb for the arm64 kcore ---
  qemu-system-arm gdb-multiarch
  # --- end arm64 ---
  # Build dependencies of crash 9 (Debian unstable's source package, see
  # scripts/build-tools.sh), from this release's archive.
  dpkg-dev make g++ bison flex gawk texinfo binutils-dev zlib1g-dev libncurses-dev
  liblzo2-dev libsnappy-dev libzstd-dev libmpfr-dev libgmp-dev  # liblzo2-dev: python-lzo (kdump-lzo) too
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# (Re)install when something is missing or the package's build inputs
# changed: pyproject.toml, setup.py, or the native read path's C source.
if ! "$venv/bin/python" -c 'import vmcorefs._readpath, pyfuse3, qemu.qmp, isal, cramjam, lzo, drgn, elftools, hypothesis, pytest, libvirt' 2>/dev/null \
   || [ "$here/pyproject.toml" -nt "$venv/.installed" ] || [ "$here/setup.py" -nt "$venv/.installed" ] \
   || [ "$here/src/vmcorefs/_readpath.c" -nt "$venv/.installed" ]; then
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q -e "$here[test,libvirt]"  # libvirt: the --domain binding
  touch "$venv/.installed"
fi
# An editable install compiles nothing, and where PYTHONDONTWRITEBYTECODE is
# set nothing ever is: every vmcorefs command would compile its modules again
# (~60 ms of each mount and dump).  Byte-compile them as an install would.
"$venv/bin/python" -m compileall -q "$here/src/vmcorefs" >/dev/null

# crash 9 (built once, ~12 minutes on 2 cores) and QEMU 10 (unpacked), both
# in the cache beside Debian's crash 8.0.2 and QEMU 7.2.
"$here/scripts/build-tools.sh"
# --dbg: the guest kernel's full debug vmlinux (crash, gdb and drgn tests);
# --old: Debian 11's kernel (5.10) too, which crash 8.0.2 fully understands;
# --backports: bookworm-backports' 6.12, run on QEMU 10.
# --arm64: Debian 12's arm64 cloud kernel (+ debug vmlinux) and busybox for -M virt.
"$here/scripts/build-guest.sh" --dbg --old --backports --arm64
