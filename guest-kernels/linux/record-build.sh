#!/usr/bin/env bash
# Prints the versions.env lines of a kernel build the archive serves: every
# package the scripts need (image, headers, source), with its version and
# sha256 as apt's signed indices give them. Paste them into KNOWN_BUILDS,
# where the build should rank. With no ABI, lists the builds served now.
#   guest-kernels/linux/record-build.sh [ABI]     # e.g. 6.1.0-57
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
if [ $# -eq 0 ]; then
  echo "Builds of linux-image-$KERNEL_FLAVOUR the archive serves now (ABI, version):"
  apt_offers | sed 's/^/  /' || true
  exit 0
fi
abi=$1
image=linux-image-$abi-$KERNEL_FLAVOUR-unsigned
version=$(apt-cache show "$image" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1 || true)
[ -n "$version" ] || { apt_refresh; version=$(apt-cache show "$image" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1 || true); }
[ -n "$version" ] || { echo "record-build: the archive does not serve $image" >&2; exit 1; }
lines=""
for spec in "image $image amd64" "headers linux-headers-$abi-$KERNEL_FLAVOUR amd64" \
  "headers linux-headers-$abi-common all" "headers linux-kbuild-6.1 amd64" "source linux-source-6.1 all"; do
  read -r role pkg arch <<<"$spec"
  uri=$(apt-get download --print-uris "$pkg=$version" 2>/dev/null || true)
  sum=$(echo "$uri" | sed -n 's/.* SHA256:\([0-9a-f]\{64\}\)$/\1/p')
  [ -n "$sum" ] || { echo "record-build: the archive does not serve $pkg=$version" >&2; exit 1; }
  lines+=$(printf '%s %s %-7s %-41s %-5s %s' "$abi" "$version" "$role" "$pkg" "$arch" "$sum")$'\n'
done
printf '%s' "$lines"
