#!/usr/bin/env bash
# Builds the test/demo guest from Debian's own packages:
#   $VMCOREFS_CACHE/guest/vmlinuz           linux-image-cloud-amd64's kernel
#   $VMCOREFS_CACHE/guest/initramfs.cpio.gz busybox + qemu_fw_cfg.ko + guest/init
#   $VMCOREFS_CACHE/guest/release           the kernel release string
# The cache lives outside the clone so CI runs and sessions reuse the download.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${VMCOREFS_CACHE:-/var/cache/vmcorefs}
out=$cache/guest
mkdir -p "$cache/debs" "$out"

# The metapackage points at the current ABI's image package.
if [ ! -s "$out/release" ] || [ "$here/guest/init" -nt "$out/initramfs.cpio.gz" ] \
   || [ "$0" -nt "$out/initramfs.cpio.gz" ]; then
  apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -qq
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "build-guest: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
  release=${pkg#linux-image-}
  if ! ls "$cache/debs/${pkg}_"*.deb >/dev/null 2>&1; then
    (cd "$cache/debs" && apt-get download "$pkg" 2>/dev/null)
  fi
  deb=$(ls "$cache/debs/${pkg}_"*.deb | tail -n 1)
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  dpkg -x "$deb" "$tmp/k"
  cp "$tmp/k/boot/vmlinuz-$release" "$out/vmlinuz"

  root=$tmp/root
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
  cp /bin/busybox "$root/bin/busybox"
  ln -s busybox "$root/bin/sh"
  cp "$tmp/k/lib/modules/$release/kernel/drivers/firmware/qemu_fw_cfg.ko" "$root/lib/modules/"
  install -m 0755 "$here/guest/init" "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.cpio.gz.tmp"
  mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
  echo "$release" > "$out/release"
  echo "build-guest: $release ready in $out"
fi

# Full debug vmlinux (for crash/gdb/drgn with debuginfo): only on request.
if [ "${1:-}" = "--dbg" ]; then
  release=$(cat "$out/release")
  if [ ! -s "$out/vmlinux" ]; then
    dbg=linux-image-$release-dbg
    ls "$cache/debs/${dbg}_"*.deb >/dev/null 2>&1 || (cd "$cache/debs" && apt-get download "$dbg" 2>/dev/null)
    tmp=$(mktemp -d)
    dpkg-deb --fsys-tarfile "$(ls "$cache/debs/${dbg}_"*.deb | tail -n 1)" \
      | tar -x -C "$tmp" "./usr/lib/debug/boot/vmlinux-$release"
    mv "$tmp/usr/lib/debug/boot/vmlinux-$release" "$out/vmlinux"
    rm -rf "$tmp"
  fi
fi
