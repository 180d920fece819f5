#!/bin/busybox sh
# /init of the lucos Linux test guest (busybox). Runs /workload.sh if present,
# reports on the serial console in "@@GUEST" lines tests parse (the workload's
# own lines are its business), and powers off through ACPI S5.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
up=$(cut -d' ' -f1 /proc/uptime)
cpus=$(grep -c ^processor /proc/cpuinfo)
echo "@@GUEST up uptime=$up cpus=$cpus kernel=$(uname -r)"
rc=0
if [ -x /workload.sh ]; then
  /workload.sh
  rc=$?
fi
echo "@@GUEST done rc=$rc"
# ACPI S5: the VM ends cleanly (lucos reports "guest powered off").
poweroff -f
