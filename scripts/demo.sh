#!/usr/bin/env bash
# The demo: boot a guest, mount it with vmcorefs, run real tools on the live
# core, print what they found, and clean up.  Run through `make demo`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}
guest=${VMCOREFS_CACHE:-/var/cache/vmcorefs}/guest
work=$(mktemp -d /tmp/vmcorefs-demo.XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt" "$work/frozen"
vmcorefs="$venv/bin/vmcorefs"
# The test harness boots the guest (the same QEMU command line as the tests).
harness=("$venv/bin/python" -m vmcorefs.testing)

cleanup() {
  fusermount3 -u "$mnt" 2>/dev/null || true
  fusermount3 -u "$work/frozen" 2>/dev/null || true
  fusermount3 -u "$work/all" 2>/dev/null || true
  [ -s "$work/guest/qemu.pid" ] && kill "$(cat "$work/guest/qemu.pid")" 2>/dev/null || true
  # libvirt domains booted (NAME DIR per line), then the daemons started, if any.
  if [ -f "$work/domains" ]; then
    while read -r name dir; do "${harness[@]}" libvirt-destroy "$name" "$dir" || true; done < "$work/domains"
  fi
  [ -f "$work/libvirtd.started" ] && { "${harness[@]}" libvirtd-stop "$work/libvirtd.started" || true; }
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Booting a demo guest (TCG, 512 MiB memfd RAM, 2 vCPUs, -device vmcoreinfo)"
up=$("${harness[@]}" boot "$work/guest" --memory memfd --mib 512 --vcpus 2)
echo "guest is up: $up"
sock=$work/guest/qmp.sock

say "vmcorefs info $sock"
"$vmcorefs" info "$sock"

say "vmcorefs mount $sock $mnt"
time "$vmcorefs" mount "$sock" "$mnt"
ls -l "$mnt"

say "readelf -lW (program headers of the live core)"
readelf -lW "$mnt/vmcore" | sed -n '/Program Headers/,/^$/p'

say "eu-readelf -n (notes: vCPU registers and VMCOREINFO)"
eu-readelf -n "$mnt/vmcore" | grep -E 'CORE|QEMU|VMCOREINFO|rip|OSRELEASE' | head -12

say "makedumpfile --dump-dmesg: the guest's kernel log, read from the running VM"
makedumpfile --message-level 4 --dump-dmesg "$mnt/vmcore" "$work/dmesg.txt"
head -3 "$work/dmesg.txt"; echo "..."; tail -3 "$work/dmesg.txt"

say "makedumpfile -c -d 31: a filtered, compressed dump without copying the guest's RAM"
time makedumpfile --message-level 4 -c -d 31 "$mnt/vmcore" "$work/dump.kdump"
echo "guest RAM: 512 MiB; filtered dump: $(du -h "$work/dump.kdump" | cut -f1)"

say "drgn without debuginfo (the guest's own kallsyms), on the running guest"
# drgn's kallsyms loader reads a few bytes at a time (~350,000 reads): those
# come from the page cache (at most --max-age old, 1 s by default).
# (docs/cookbook.md shows the program; it prints linux_banner, then jiffies_64.)
time "${harness[@]}" drgn-kallsyms "$mnt/vmcore" jiffies_64

vmlinux=$guest/vmlinux
# crash 9 as scripts/build-tools.sh builds it (Debian 12's crash 8.0.2 lists
# only the idle tasks of this 6.1 kernel and cannot unwind its vCPUs:
# docs/cookbook.md).  A second mount, --freeze (one instant), on the guest's
# second QMP monitor ($mnt holds the first: QMP serves one client per
# monitor).  Nothing crash prints is hidden but the log's head.
crash9=${VMCOREFS_CACHE:-/var/cache/vmcorefs}/crash-9/bin/crash
say "crash 9 with the guest kernel's debug vmlinux, on the live vmcore (mounted --freeze)"
"$vmcorefs" mount --freeze "$work/guest/own-qmp.sock" "$work/frozen"
printf 'sys\nps\nbt -a\nlog | tail -n 2\nquit\n' | "$crash9" -s "$vmlinux" "$work/frozen/vmcore" > "$work/crash.txt" 2>&1
fusermount3 -u "$work/frozen"
task='^[ >] *[0-9]+ +[0-9]+ +[0-9]+ +[0-9a-f]+ +[A-Z][A-Z] '
sed -n '1,/^ *PANIC:/p' "$work/crash.txt"
echo "ps: $(grep -Ec "$task" "$work/crash.txt") tasks, e.g."
grep -E "$task" "$work/crash.txt" | sed -n '1,3p;/\[kthreadd\]/p'
echo "bt -a: $(grep -c '^PID: ' "$work/crash.txt") vCPUs unwound, e.g."
sed -n '/^PID: /,/^$/p' "$work/crash.txt" | grep -E '^PID: |^ +#[0-9]' | head -6
echo "log | tail -n 2:"; tail -n 2 "$work/crash.txt"
if grep -Eiq 'error|invalid|fail|cannot|warning' "$work/crash.txt"; then
  echo "crash printed error lines:"; grep -Ei 'error|invalid|fail|cannot|warning' "$work/crash.txt"; exit 1
fi

say "drgn with debug info: tasks and the stack of what runs on vCPU 0"
"$venv/bin/drgn" -q -c "$mnt/vmcore" -s "$vmlinux" -e '
from drgn.helpers.linux.pid import for_each_task
from drgn.helpers.linux.sched import cpu_curr
print(len(list(for_each_task(prog))), "tasks:", " ".join(sorted({t.comm.string_().decode() for t in for_each_task(prog)})))
print(prog.stack_trace(cpu_curr(prog, 0)))'

say "gdb on kcore (kernel-virtual view from the guest's page tables; KASLR applied by gdbinit)"
gdb -q -batch "$vmlinux" -x "$mnt/gdbinit" -ex 'print linux_banner' -ex 'info threads' -ex 'bt 5' 2>&1 | grep -v '^warning'

say "Live: the same read twice, 1.5 s apart (no copy; cached pages live at most --max-age, 1 s)"
for _ in 1 2; do
  echo "printk ring head id: $("${harness[@]}" printk-head "$mnt")"
  sleep 1.5
done

say "Unmounting"
fusermount3 -u "$mnt"
kill "$(cat "$work/guest/qemu.pid")"

# libvirt: libvirtd started as the tests start it (without systemd) unless
# it runs; two transient TCG domains of the test kernel (virsh create).
say "libvirt: two domains, then vmcorefs mount --all (one directory per running domain)"
"${harness[@]}" libvirtd-start "$work/libvirtd.started"
doms=("vmcorefs-demo-private-$$" "vmcorefs-demo-memfd-$$")
for i in 0 1; do
  name=${doms[$i]}
  if [ "$i" = 0 ]; then opts=(--memory private); else opts=(--memory memfd --vmcoreinfo); fi
  dir=$("${harness[@]}" libvirt-boot "$name" "${opts[@]}")
  echo "$name $dir" >> "$work/domains"
  echo "$name is up (${opts[*]})"
done
virsh -c qemu:///system list
mkdir -p "$work/all"
"$vmcorefs" mount --all "$work/all"
ls -l "$work/all"
ls -l "$work/all/${doms[0]}"

say "drgn without debuginfo on ${doms[0]} (private RAM, VMCOREINFO found in guest RAM)"
"${harness[@]}" drgn-kallsyms "$work/all/${doms[0]}/vmcore" jiffies_64

say "makedumpfile --dump-dmesg on ${doms[1]} (memfd RAM)"
makedumpfile --message-level 4 --dump-dmesg "$work/all/${doms[1]}/vmcore" "$work/dmesg-libvirt.txt"
head -1 "$work/dmesg-libvirt.txt"; echo "..."; tail -2 "$work/dmesg-libvirt.txt"

say "Unmounting, destroying the domains"
fusermount3 -u "$work/all"
while read -r name dir; do "${harness[@]}" libvirt-destroy "$name" "$dir"; done < "$work/domains"
rm "$work/domains"
echo "done."
