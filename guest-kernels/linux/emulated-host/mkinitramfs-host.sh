#!/usr/bin/env bash
# Builds the emulated host's initramfs: busybox, the KVM modules of the pinned
# kernel, the lucos binary with the shared libraries it needs, the guest's
# kernel and initramfs, and the scenario to run.
#   mkinitramfs-host.sh OUT.cpio.gz KERNEL_PKG_DIR LUCOS_BIN GUEST_INITRD SCENARIO.sh
# With WITH_QEMU=1 it also carries qemu-system-x86_64 (the reference VMM for
# benchmarks) with its libraries and microvm firmware; with WITH_VMLINUX=FILE,
# that ELF kernel as /guest/vmlinux.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1 pkg=$2 lucos=$3 guest_initrd=$4 scenario=$5
# The build the kernel package directory holds (written by fetch-kernel.sh).
. "$pkg/lucos-build.env"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,modules,guest,lib/lucos,lib64}
cp "$(command -v busybox)" "$root/bin/busybox"
cp "$here/host-init.sh" "$root/init"
chmod 755 "$root/init"
kmod="$pkg/lib/modules/$KERNEL_RELEASE/kernel"
cp "$kmod/virt/lib/irqbypass.ko" "$kmod/arch/x86/kvm/kvm.ko" "$kmod/arch/x86/kvm/kvm-amd.ko" "$root/modules/"
# A binary and its shared libraries: the dynamic loader where the binary
# expects it, the rest in /lib/lucos (LD_LIBRARY_PATH in host-init.sh).
add_binary() {
  cp "$1" "$root/bin/$2"
  ldd "$1" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r lib; do
    [ -f "$lib" ] || continue
    case "$lib" in
      */ld-linux*) cp -L "$lib" "$root/lib64/" ;;
      *) cp -L "$lib" "$root/lib/lucos/" ;;
    esac
  done
}
add_binary "$lucos" lucos
# WITH_BASELINE=FILE: another lucos binary (an earlier build), as
# /bin/lucos-baseline, for benchmarks that compare the two in one run.
if [ -n "${WITH_BASELINE:-}" ]; then
  add_binary "$WITH_BASELINE" lucos-baseline
fi
if [ "${WITH_QEMU:-0}" = 1 ]; then
  add_binary "$(command -v qemu-system-x86_64)" qemu-system-x86_64
  mkdir -p "$root/usr/share/qemu"
  for f in bios-microvm.bin linuxboot_dma.bin pvh.bin kvmvapic.bin; do
    cp -L /usr/share/qemu/$f "$root/usr/share/qemu/"
  done
fi
cp "$pkg/boot/vmlinuz-$KERNEL_RELEASE" "$root/guest/vmlinuz"
cp "$guest_initrd" "$root/guest/initrd.gz"
if [ -n "${WITH_VMLINUX:-}" ]; then
  cp "$WITH_VMLINUX" "$root/guest/vmlinux"
fi
# WITH_TESTKERNEL=FILE: the lucos test kernel, as /guest/testkernel.elf (a
# kernel of another build, for the symbol-db mismatch checks).
if [ -n "${WITH_TESTKERNEL:-}" ]; then
  cp "$WITH_TESTKERNEL" "$root/guest/testkernel.elf"
fi
# WITH_FILES=DIR: files the scenario uses (patches, keys), as /guest/files.
if [ -n "${WITH_FILES:-}" ]; then
  cp -r "$WITH_FILES" "$root/guest/files"
fi
cp "$scenario" "$root/scenario.sh"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$out"
