#!/bin/busybox sh
# /init of the emulated hardware-virtualization host: loads KVM (kvm-amd with
# nested paging), runs /scenario.sh with lucos, reports, and powers off.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp
for m in irqbypass kvm kvm-amd; do
  insmod "/modules/$m.ko" || echo "@@HOST insmod $m failed"
done
npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)
echo "@@HOST kvm=$( [ -c /dev/kvm ] && echo yes || echo no) npt=$npt cpus=$(grep -c ^processor /proc/cpuinfo)"
export LUCOS=/bin/lucos QEMU=/bin/qemu-system-x86_64 GUEST_KERNEL=/guest/vmlinuz GUEST_INITRD=/guest/initrd.gz
export LUCOS_RUN_DIR=/run/lucos LD_LIBRARY_PATH=/lib/lucos
sh /scenario.sh
echo "@@HOST scenario rc=$?"
poweroff -f
