#!/usr/bin/env bash
# Builds the newer tools the test matrix runs, next to Debian 12's own and
# without replacing them (the system's crash 8.0.2 and QEMU 7.2 stay):
#   $VMCOREFS_CACHE/crash-9/bin/crash  crash 9.x, built from Debian unstable's
#       source package (which carries the gdb source it bundles). Debian 12's
#       crash 8.0.2 misreads `struct pid` since Linux 6.5's flexible array
#       (in 6.1.y too: `ps` lists 2 tasks) and, like 8.0.6, trips over the
#       cloud kernels' missing machine-check exception stack (`bt -a`).
#   $VMCOREFS_CACHE/qemu-10/           QEMU 10 of bookworm-backports, unpacked
#       with the SeaBIOS it wants (linked into its usr/share/qemu): run
#       usr/bin/qemu-system-x86_64 with `-L usr/share/qemu` of that
#       directory. It runs on Debian 12's libraries; the 6.12 guest kernel
#       needs it under TCG (QEMU 7.2's qemu64 CPU panics it early).
#   $VMCOREFS_CACHE/crash-9-arm64/bin/crash  the same crash 9 source built
#       with target=ARM64: an x86-64 binary that reads arm64 guests' cores.
# Usage: build-tools.sh [crash] [qemu] [crash-arm64]   (default: all)
# Idempotent: what is already built is only checked.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${VMCOREFS_CACHE:-/var/cache/vmcorefs}
# shellcheck source=scripts/private-apt.sh
. "$here/scripts/private-apt.sh"
want=("$@")
[ ${#want[@]} -gt 0 ] || want=(crash qemu crash-arm64)

# crash9 [OUT SRC GOAL...]: crash 9 into OUT/bin/crash, built in SRC with
# `make GOAL...` (default: this host's target with lzo, snappy and zstd).
crash9() {
  local out=${1:-$cache/crash-9} src=${2:-$cache/src/crash}
  local goals=("${@:3}") lock
  [ ${#goals[@]} -gt 0 ] || goals=(lzo snappy zstd)
  crash9_built "$out" && return
  # One build per SRC at a time: a second set-up waits for the first one's
  # crash instead of emptying SRC under its make.
  mkdir -p "${src%/*}"
  exec {lock}>"$src.lock"
  flock "$lock"
  if crash9_built "$out"; then exec {lock}>&-; return; fi
  private_apt sid deb-src sid
  rm -rf "$src"
  mkdir -p "$src"
  # unstable moves on: with stale lists the old files are gone, so refetch once.
  local get=(apt-get -qq -o APT::Sandbox::User=root "${APT_OPTS[@]}" source --download-only crash)
  (cd "$src" && "${get[@]}") || { private_apt_update; (cd "$src" && "${get[@]}"); }
  # apt checked the files against the signed Sources list.
  (cd "$src" && dpkg-source --no-check -x ./crash_*.dsc build >/dev/null)
  echo "build-tools: building $(cd "$src" && ls crash_*.dsc), make ${goals[*]} (about 12 minutes on 2 cores)"
  (cd "$src/build" && make -j"$(nproc)" "${goals[@]}" >"$src/build.log" 2>&1) \
    || { tail -n 40 "$src/build.log" >&2; echo "build-tools: crash build failed (log: $src/build.log)" >&2; exit 1; }
  rm -rf "$out.tmp"
  install -D -m 0755 "$src/build/crash" "$out.tmp/bin/crash"
  "$out.tmp/bin/crash" --version | grep -q '^crash 9\.' \
    || { echo "build-tools: $src/build/crash is not crash 9" >&2; exit 1; }
  rm -rf "$out"
  mv "$out.tmp" "$out"
  rm -rf "$src"  # a rebuild downloads the source again (unstable moves on)
  exec {lock}>&-
  echo "build-tools: $("$out/bin/crash" --version | grep -m 1 '^crash ') ready in $out"
}

crash9_built() {
  [ -x "$1/bin/crash" ] && "$1/bin/crash" --version 2>/dev/null | grep -q '^crash 9\.'
}

# --- crash for arm64 guests (issue 14) ---
# The same source in its own directory (crash9 empties its SRC), for ARM64.
crash9_arm64() {
  crash9 "$cache/crash-9-arm64" "$cache/src/crash-arm64" target=ARM64
}
# --- end crash for arm64 guests ---

qemu10() {
  local out=$cache/qemu-10 bin=usr/bin/qemu-system-x86_64
  if [ -x "$out/$bin" ] && "$out/$bin" --version 2>/dev/null | grep -q 'version 1[0-9]\.'; then
    return
  fi
  private_apt bookworm-backports deb bookworm-backports
  local tmp pkgs=(qemu-system-x86 qemu-system-data seabios)
  tmp=$(mktemp -d)
  # As root into a root-owned directory: no sandbox user (apt would warn).
  (cd "$tmp" && apt-get -qq -o APT::Sandbox::User=root "${APT_OPTS[@]}" download "${pkgs[@]}") \
    || { private_apt_update; (cd "$tmp" && apt-get -qq -o APT::Sandbox::User=root "${APT_OPTS[@]}" download "${pkgs[@]}"); }
  rm -rf "$out.tmp"
  local deb
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$out.tmp"; done
  rm -rf "$tmp"
  # Its SeaBIOS where -L looks first: the system's older one would be found
  # through QEMU's built-in firmware path otherwise.
  local f
  for f in "$out.tmp"/usr/share/seabios/*.bin; do
    [ -e "$out.tmp/usr/share/qemu/${f##*/}" ] || ln -s "../seabios/${f##*/}" "$out.tmp/usr/share/qemu/${f##*/}"
  done
  if ldd "$out.tmp/$bin" | grep 'not found' >&2 \
     || ! "$out.tmp/$bin" --version | grep -q 'version 1[0-9]\.'; then
    echo "build-tools: the unpacked QEMU does not run on this machine's libraries" >&2
    exit 1
  fi
  rm -rf "$out"
  mv "$out.tmp" "$out"
  echo "build-tools: $("$out/$bin" --version | head -n 1) ready in $out"
}

for w in "${want[@]}"; do
  case $w in
    crash) crash9 ;;
    qemu) qemu10 ;;
    crash-arm64) crash9_arm64 ;;
    *) echo "usage: $0 [crash] [qemu] [crash-arm64]" >&2; exit 2 ;;
  esac
done
