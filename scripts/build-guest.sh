#!/usr/bin/env bash
# Builds test/demo guests from Debian's own packages:
#   $VMCOREFS_CACHE/guest/vmlinuz           linux-image-cloud-amd64's kernel (this release)
#   $VMCOREFS_CACHE/guest/initramfs.cpio.gz busybox + qemu_fw_cfg.ko + guest/init
#   $VMCOREFS_CACHE/guest/release           the kernel release string
#   $VMCOREFS_CACHE/guest/vmlinux           its full debug vmlinux (--dbg)
# and, with --old, the same for Debian 11's cloud kernel in
# $VMCOREFS_CACHE/guest-bullseye (fetched through a private apt directory
# made from this machine's own Debian sources with the suite renamed, so the
# system's apt configuration is left untouched).
# The cache lives outside the clone so CI runs and sessions reuse downloads.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${VMCOREFS_CACHE:-/var/cache/vmcorefs}
want_dbg=0 want_old=0
for a in "$@"; do
  case $a in
    --dbg) want_dbg=1 ;;
    --old) want_old=1 ;;
    *) echo "usage: $0 [--dbg] [--old]" >&2; exit 2 ;;
  esac
done

# private_apt SUITE: apt options for a private copy of the system's Debian
# sources with bookworm renamed to SUITE.
private_apt() {
  local suite=$1 dir=$cache/apt-$1
  mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/sources"
  # Only the main archive (no -security stanza): its point-release kernel has
  # a matching -dbg package there, and it no longer changes.
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    awk -v RS= -v ORS='\n\n' '!/-security/' /etc/apt/sources.list.d/debian.sources \
      | sed "s/bookworm/$suite/g" > "$dir/sources/debian.sources"
  else
    grep -h '^deb ' /etc/apt/sources.list | grep -v -- -security | sed "s/bookworm/$suite/g" > "$dir/sources/debian.list"
  fi
  APT_OPTS=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$dir/sources"
            -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache::Archives=$dir/archives"
            -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=")
  if [ ! -e "$dir/lists/.updated" ] || [ "$dir/lists/.updated" -ot "$0" ]; then
    apt-get "${APT_OPTS[@]}" update -qq
    touch "$dir/lists/.updated"
  fi
}

# build OUT [apt options...]: kernel + initramfs of linux-image-cloud-amd64.
build() {
  local out=$1; shift
  local apt=("$@")
  mkdir -p "$cache/debs" "$out"
  if [ -s "$out/release" ] && [ "$out/initramfs.cpio.gz" -nt "$here/guest/init" ] \
     && [ "$out/initramfs.cpio.gz" -nt "$0" ]; then
    return
  fi
  apt-cache "${apt[@]}" show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get "${apt[@]}" update -qq
  local pkg
  pkg=$(apt-cache "${apt[@]}" depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "build-guest: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
  local release=${pkg#linux-image-}
  ls "$cache/debs/${pkg}_"*.deb >/dev/null 2>&1 || (cd "$cache/debs" && apt-get "${apt[@]}" download "$pkg" 2>/dev/null)
  local deb tmp
  deb=$(ls "$cache/debs/${pkg}_"*.deb | tail -n 1)
  tmp=$(mktemp -d)
  dpkg -x "$deb" "$tmp/k"
  cp "$tmp/k/boot/vmlinuz-$release" "$out/vmlinuz"
  local root=$tmp/root
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
  cp /bin/busybox "$root/bin/busybox"
  ln -s busybox "$root/bin/sh"
  cp "$tmp/k/lib/modules/$release/kernel/drivers/firmware/qemu_fw_cfg.ko" "$root/lib/modules/"
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
  [ -s "$out/vmlinux" ] && return
  local pkg=linux-image-$release-dbg tmp
  ls "$cache/debs/${pkg}_"*.deb >/dev/null 2>&1 || (cd "$cache/debs" && apt-get "${apt[@]}" download "$pkg" 2>/dev/null)
  tmp=$(mktemp -d)
  dpkg-deb --fsys-tarfile "$(ls "$cache/debs/${pkg}_"*.deb | tail -n 1)" \
    | tar -x -C "$tmp" "./usr/lib/debug/boot/vmlinux-$release"
  mv "$tmp/usr/lib/debug/boot/vmlinux-$release" "$out/vmlinux"
  rm -rf "$tmp"
  echo "build-guest: debug vmlinux of $release ready in $out"
}

build "$cache/guest"
[ $want_dbg = 1 ] && dbg "$cache/guest"
if [ $want_old = 1 ]; then
  private_apt bullseye
  build "$cache/guest-bullseye" "${APT_OPTS[@]}"
  dbg "$cache/guest-bullseye" "${APT_OPTS[@]}"
fi
exit 0
