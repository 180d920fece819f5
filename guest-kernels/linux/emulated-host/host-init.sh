#!/bin/busybox sh
# /init of the emulated hardware-virtualization host: loads KVM (kvm-amd with
# nested paging), runs /scenario.sh with lucos, reports, and powers off.
/bin/busybox --install -s /bin
KVM_AMD_PARAMS="vls=0 vgif=0"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp
# kvm-amd without virtual VMLOAD/VMSAVE and virtual GIF: QEMU TCG's emulation
# of them is where the emulated host was seen to crash (host GS base lost after
# #VMEXIT, kernel stack overflow in __svm_vcpu_run) about once in 15 guest boots.
insmod /modules/irqbypass.ko || echo "@@HOST insmod irqbypass failed"
insmod /modules/kvm.ko || echo "@@HOST insmod kvm failed"
insmod /modules/kvm-amd.ko $KVM_AMD_PARAMS || echo "@@HOST insmod kvm-amd failed"
grep . /sys/module/kvm_amd/parameters/* 2>/dev/null | sed 's|/sys/module/kvm_amd/parameters/|@@HOST kvm_amd.|'
npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)
echo "@@HOST kvm=$( [ -c /dev/kvm ] && echo yes || echo no) npt=$npt cpus=$(grep -c ^processor /proc/cpuinfo)"
# Kernel messages up to info on the console: a hung-task report then carries
# its call trace, a KVM problem its details.
echo 6 >/proc/sys/kernel/printk
# KVM's own trace of VM exits and injected events: when a guest dies, the
# scenario prints its tail (the guest's last exits, the RIP of the shutdown).
if mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null; then
  echo 2048 >/sys/kernel/tracing/buffer_size_kb
  for e in kvm_exit kvm_inj_exception kvm_inj_virq kvm_page_fault kvm_msr kvm_pio; do
    echo 1 >/sys/kernel/tracing/events/kvm/$e/enable 2>/dev/null || echo "@@HOST no trace event $e"
  done
fi
export LUCOS=/bin/lucos QEMU=/bin/qemu-system-x86_64 GUEST_KERNEL=/guest/vmlinuz GUEST_VMLINUX=/guest/vmlinux GUEST_INITRD=/guest/initrd.gz OTHER_KERNEL=/guest/testkernel.elf FILES=/guest/files
export LUCOS_RUN_DIR=/run/lucos LD_LIBRARY_PATH=/lib/lucos LUCOS_EMULATED_HOST=1
[ -x /bin/lucos-baseline ] && export LUCOS_BASELINE=/bin/lucos-baseline
# A heartbeat: the test harness treats a host that prints nothing, not even
# this, for minutes as hung (seen under QEMU TCG) and retries it.
( while :; do sleep 20; echo "@@HOST alive"; done ) &
sh /scenario.sh
echo "@@HOST scenario rc=$?"
poweroff -f
