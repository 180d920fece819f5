#!/usr/bin/env bash
# Boots the emulated host (QEMU TCG, AMD EPYC with SVM and NPT) on the chosen
# Debian kernel with the given initramfs; its console is this script's stdout.
#   run.sh KERNEL_PKG_DIR HOST_INITRD [SMP] [MEM_MB]
set -euo pipefail
pkg=$1 initrd=$2 smp=${3:-2} mem=${4:-2048}
# The build the kernel package directory holds (written by fetch-kernel.sh).
. "$pkg/lucos-build.env"
exec qemu-system-x86_64 -accel tcg,thread=multi -cpu EPYC,+svm,+npt -smp "$smp" -m "$mem" \
  -machine q35 -nographic -no-reboot -nodefaults -serial stdio \
  -kernel "$pkg/boot/vmlinuz-$KERNEL_RELEASE" -initrd "$initrd" \
  -append "console=ttyS0 panic=-1 quiet"
