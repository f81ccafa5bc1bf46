#!/usr/bin/env bash
# Builds test/demo guests from Debian's own packages:
#   $VMCOREFS_CACHE/guest/vmlinuz           linux-image-cloud-amd64's kernel (this release)
#   $VMCOREFS_CACHE/guest/initramfs.cpio.gz busybox + qemu_fw_cfg.ko (+ virtio-mem's modules) + guest/init
#   $VMCOREFS_CACHE/guest/release           the kernel release string
#   $VMCOREFS_CACHE/guest/vmlinux           its full debug vmlinux (--dbg)
# and the same, with the debug vmlinux, for
#   --old        Debian 11's cloud kernel (5.10) in $VMCOREFS_CACHE/guest-bullseye
#   --backports  bookworm-backports' cloud kernel (6.12) in
#                $VMCOREFS_CACHE/guest-backports; it needs QEMU 10 under TCG
#                (QEMU 7.2's qemu64 CPU panics it early): scripts/build-tools.sh
#   --arm64      Debian 12's linux-image-cloud-arm64 (+ its debug vmlinux) and
#                busybox-static:arm64 in $VMCOREFS_CACHE/guest-arm64, for
#                qemu-system-aarch64 -M virt (arm64 packages unpacked with
#                dpkg -x, never installed)
# all fetched through private apt directories (scripts/private-apt.sh), so
# the system's apt configuration is left untouched.
# The cache lives outside the clone so CI runs and sessions reuse downloads.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${VMCOREFS_CACHE:-/var/cache/vmcorefs}
# shellcheck source=scripts/private-apt.sh
. "$here/scripts/private-apt.sh"
want_dbg=0 want_old=0 want_backports=0 want_arm64=0
for a in "$@"; do
  case $a in
    --dbg) want_dbg=1 ;;
    --old) want_old=1 ;;
    --backports) want_backports=1 ;;
    --arm64) want_arm64=1 ;;
    *) echo "usage: $0 [--dbg] [--old] [--backports] [--arm64]" >&2; exit 2 ;;
  esac
done

# fetch_deb PKG [apt options...]: PKG's .deb into $cache/debs unless there.
fetch_deb() {
  local pkg=$1; shift
  ls "$cache/debs/${pkg}_"*.deb >/dev/null 2>&1 && return
  # As root into a root-owned directory: no sandbox user (apt would warn).
  (cd "$cache/debs" && apt-get -qq -o APT::Sandbox::User=root "$@" download "$pkg") \
    || { echo "build-guest: cannot download $pkg" >&2; exit 1; }
}

# The guest's Debian architecture and its busybox (--arm64 sets both).
karch=amd64 busybox=/bin/busybox

# build OUT [apt options...]: kernel + initramfs of linux-image-cloud-$karch.
build() {
  local out=$1; shift
  local apt=("$@")
  mkdir -p "$cache/debs" "$out"
  if [ -s "$out/release" ] && [ "$out/initramfs.cpio.gz" -nt "$here/guest/init" ] \
     && [ "$out/initramfs.cpio.gz" -nt "$0" ]; then
    return
  fi
  apt-cache "${apt[@]}" show "linux-image-cloud-$karch" >/dev/null 2>&1 || apt-get "${apt[@]}" update -qq
  local pkg
  pkg=$(apt-cache "${apt[@]}" depends "linux-image-cloud-$karch" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "build-guest: cannot resolve linux-image-cloud-$karch" >&2; exit 1; }
  local release=${pkg#linux-image-}
  fetch_deb "$pkg" "${apt[@]}"
  local deb tmp
  deb=$(ls "$cache/debs/${pkg}_"*.deb | tail -n 1)
  tmp=$(mktemp -d)
  dpkg -x "$deb" "$tmp/k"
  # Replaced by rename: a guest booting meanwhile reads the old file whole.
  cp "$tmp/k/boot/vmlinuz-$release" "$out/vmlinuz.tmp"
  mv "$out/vmlinuz.tmp" "$out/vmlinuz"
  local root=$tmp/root
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
  cp "$busybox" "$root/bin/busybox"
  ln -s busybox "$root/bin/sh"
  # busybox's insmod takes an uncompressed module only.
  local ko=$tmp/k/lib/modules/$release/kernel/drivers/firmware/qemu_fw_cfg.ko
  if [ -f "$ko" ]; then cp "$ko" "$root/lib/modules/"
  elif [ -f "$ko.xz" ]; then xz -dc "$ko.xz" > "$root/lib/modules/qemu_fw_cfg.ko"
  else echo "build-guest: no qemu_fw_cfg module in $deb" >&2; exit 1
  fi
  # virtio-mem's driver and what it needs, in load order (init loads them
  # when the guest has a virtio-mem device); a kernel may lack some.
  local m
  for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mem; do
    ko=$tmp/k/lib/modules/$release/kernel/drivers/virtio/$m.ko
    if [ -f "$ko" ]; then cp "$ko" "$root/lib/modules/"
    elif [ -f "$ko.xz" ]; then xz -dc "$ko.xz" > "$root/lib/modules/$m.ko"
    fi
  done
  install -m 0755 "$here/guest/init" "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.cpio.gz.tmp"
  mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
  echo "$release" > "$out/release"
  rm -rf "$tmp"
  echo "build-guest: $release ready in $out"
}

# dbg OUT [apt options...]: the full debug vmlinux of OUT's kernel.
dbg() {
  local out=$1; shift
  local apt=("$@")
  local release
  release=$(cat "$out/release")
  # vmlinux.release: the kernel the vmlinux belongs to (a suite may move on).
  [ -s "$out/vmlinux" ] && [ "$(cat "$out/vmlinux.release" 2>/dev/null)" = "$release" ] && return
  local pkg=linux-image-$release-dbg tmp
  fetch_deb "$pkg" "${apt[@]}"
  tmp=$(mktemp -d)
  dpkg-deb --fsys-tarfile "$(ls "$cache/debs/${pkg}_"*.deb | tail -n 1)" \
    | tar -x -C "$tmp" "./usr/lib/debug/boot/vmlinux-$release"
  mv "$tmp/usr/lib/debug/boot/vmlinux-$release" "$out/vmlinux"
  echo "$release" > "$out/vmlinux.release"
  rm -rf "$tmp"
  echo "build-guest: debug vmlinux of $release ready in $out"
}

build "$cache/guest"
[ $want_dbg = 1 ] && dbg "$cache/guest"
if [ $want_old = 1 ]; then
  # The main archive only (no -security): its point-release kernel has a
  # matching -dbg package there, and it no longer changes.
  private_apt bullseye deb bullseye bullseye-updates
  build "$cache/guest-bullseye" "${APT_OPTS[@]}"
  dbg "$cache/guest-bullseye" "${APT_OPTS[@]}"
fi
if [ $want_backports = 1 ]; then
  private_apt bookworm-backports deb bookworm-backports
  build "$cache/guest-backports" "${APT_OPTS[@]}"
  dbg "$cache/guest-backports" "${APT_OPTS[@]}"
fi
# --- arm64 guest (issue 14) ---
if [ $want_arm64 = 1 ]; then
  # A private apt directory of arm64 lists: packages are only downloaded
  # and unpacked (dpkg -x), nothing arm64 is installed on the host.
  # Its architecture through APT_CONFIG, so that every apt call (the list
  # updates of private_apt too) sees arm64 only.
  mkdir -p "$cache/apt-bookworm-arm64"
  printf 'APT::Architecture "arm64";\nAPT::Architectures { "arm64"; };\n' > "$cache/apt-bookworm-arm64/apt.conf"
  export APT_CONFIG=$cache/apt-bookworm-arm64/apt.conf
  private_apt bookworm-arm64 deb bookworm bookworm-updates
  arm64=("${APT_OPTS[@]}")
  mkdir -p "$cache/debs"
  ls "$cache/debs/busybox-static_"*_arm64.deb >/dev/null 2>&1 \
    || (cd "$cache/debs" && apt-get -qq -o APT::Sandbox::User=root "${arm64[@]}" download busybox-static) \
    || { echo "build-guest: cannot download busybox-static:arm64" >&2; exit 1; }
  bbtmp=$(mktemp -d)
  dpkg -x "$(ls "$cache/debs/busybox-static_"*_arm64.deb | tail -n 1)" "$bbtmp"
  karch=arm64 busybox=$bbtmp/bin/busybox
  build "$cache/guest-arm64" "${arm64[@]}"
  dbg "$cache/guest-arm64" "${arm64[@]}"
  rm -rf "$bbtmp"
  unset APT_CONFIG
fi
# --- end arm64 guest ---
exit 0
