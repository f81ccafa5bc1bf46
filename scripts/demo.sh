#!/usr/bin/env bash
# The demo: boot a guest, mount it with vmcorefs, run real tools on the live
# core, print what they found, and clean up.  Run through `make demo`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}
guest=${VMCOREFS_CACHE:-/var/cache/vmcorefs}/guest
work=$(mktemp -d /tmp/vmcorefs-demo.XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt"
vmcorefs="$venv/bin/vmcorefs"
qpid=

cleanup() {
  fusermount3 -u "$mnt" 2>/dev/null || true
  [ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Booting a demo guest (TCG, 512 MiB memfd RAM, 2 vCPUs, -device vmcoreinfo)"
qemu-system-x86_64 -accel tcg -cpu qemu64 -smp 2 -m 512M \
  -object memory-backend-memfd,id=mem0,size=512M,share=on -machine pc,memory-backend=mem0 \
  -kernel "$guest/vmlinuz" -initrd "$guest/initramfs.cpio.gz" \
  -append "console=ttyS0 panic=-1 printk.devkmsg=on" -device vmcoreinfo \
  -display none -vga none -nodefaults -no-reboot -serial "file:$work/serial.log" \
  -qmp "unix:$work/qmp.sock,server=on,wait=off" &
qpid=$!
for _ in $(seq 600); do
  grep -q VMCOREFS-GUEST-READY "$work/serial.log" 2>/dev/null && break
  sleep 0.1
done
grep -q VMCOREFS-GUEST-READY "$work/serial.log" || { echo "guest did not boot"; exit 1; }
echo "guest is up: $(grep -a VMCOREFS-GUEST-READY "$work/serial.log")"

say "vmcorefs info $work/qmp.sock"
"$vmcorefs" info "$work/qmp.sock"

say "vmcorefs mount $work/qmp.sock $mnt"
time "$vmcorefs" mount "$work/qmp.sock" "$mnt"
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
time "$venv/bin/python" - "$mnt/vmcore" <<'PY'
import sys, drgn
from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms
prog = drgn.Program()
prog.set_core_dump(sys.argv[1])
prog.register_symbol_finder("vmlinux_kallsyms", load_vmlinux_kallsyms(prog), enable_index=0)
banner = prog.read(prog.symbol("linux_banner").address, 200).split(b"\0")[0].decode()
print("linux_banner:", banner.strip())
jiffies = prog.symbol("jiffies_64").address
print("jiffies_64 now:", int.from_bytes(prog.read(jiffies, 8), "little"))
PY

vmlinux=$guest/vmlinux
say "crash with the guest kernel's debug vmlinux, on the live vmcore"
printf 'sys\nlog\nquit\n' | crash -s "$vmlinux" "$mnt/vmcore" 2>/dev/null | sed -n '1,14p;/VMCOREFS-TICK/{p;q}'

say "drgn with debug info: tasks and the stack of what runs on vCPU 0"
"$venv/bin/drgn" -q -c "$mnt/vmcore" -s "$vmlinux" -e '
from drgn.helpers.linux.pid import for_each_task
from drgn.helpers.linux.sched import cpu_curr
print(len(list(for_each_task(prog))), "tasks:", " ".join(sorted({t.comm.string_().decode() for t in for_each_task(prog)})))
print(prog.stack_trace(cpu_curr(prog, 0)))'

say "gdb on kcore (kernel-virtual view from the guest's page tables; KASLR applied by gdbinit)"
gdb -q -batch "$vmlinux" -x "$mnt/gdbinit" -ex 'print linux_banner' -ex 'info threads' -ex 'bt 5' 2>&1 | grep -v '^warning'

say "Live: the same read twice, 1.5 s apart (no copy; cached pages live at most --max-age, 1 s)"
"$venv/bin/python" - "$mnt" <<'PY'
import os, struct, sys, time
mnt = sys.argv[1]
vci = dict(l.split("=", 1) for l in open(f"{mnt}/vmcoreinfo").read().splitlines() if "=" in l)
phys_base = int(vci["NUMBER(phys_base)"]) & (2**64 - 1)
addr = (int(vci["SYMBOL(printk_rb_static)"], 16) - 0xFFFFFFFF80000000 + phys_base
        + int(vci["OFFSET(printk_ringbuffer.desc_ring)"]) + int(vci["OFFSET(prb_desc_ring.head_id)"])) % 2**64
fd = os.open(f"{mnt}/pmem", os.O_RDONLY)
for _ in range(2):
    print("printk ring head id:", struct.unpack("<Q", os.pread(fd, 8, addr))[0])
    time.sleep(1.5)
PY

say "Unmounting"
fusermount3 -u "$mnt"
echo "done."
