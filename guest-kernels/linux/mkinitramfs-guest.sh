#!/usr/bin/env bash
# Builds the busybox initramfs of the Linux test guest.
#   guest-kernels/linux/mkinitramfs-guest.sh OUT.cpio.gz [WORKLOAD.sh [FILES_DIR]]
# The workload, if given, becomes /workload.sh and runs as root after boot;
# /init reports its exit status as "@@GUEST done rc=N". FILES_DIR, if given,
# is copied to /files (programs and modules the workload uses).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1
workload=${2:-}
files=${3:-}
busybox=$(command -v busybox) || { echo "mkinitramfs-guest: busybox-static is not installed (scripts/setup.sh)" >&2; exit 1; }
if ! file -L "$busybox" 2>/dev/null | grep -q "statically linked" && ldd "$busybox" >/dev/null 2>&1; then
  echo "mkinitramfs-guest: $busybox is not static (install busybox-static)" >&2
  exit 1
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp "$busybox" "$root/bin/busybox"
cp "$here/guest-init.sh" "$root/init"
chmod 755 "$root/init"
if [ -n "$workload" ]; then
  cp "$workload" "$root/workload.sh"
  chmod 755 "$root/workload.sh"
fi
if [ -n "$files" ]; then
  cp -r "$files" "$root/files"
fi
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$out"
