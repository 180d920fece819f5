#!/usr/bin/env bash
# Fetches the pinned Debian cloud kernel package, checks its sha256, and
# unpacks it into the asset cache. Idempotent. Prints the unpacked directory.
#   guest-kernels/linux/fetch-kernel.sh [CACHE_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
# shellcheck source=fetch-deb.sh
. "$here/fetch-deb.sh"
cache=$(asset_cache "${1:-}")
deb="$cache/${KERNEL_PKG}_${KERNEL_PKG_VERSION}_amd64.deb"
out="$cache/$KERNEL_PKG-$KERNEL_PKG_VERSION"

if [ -f "$out/.complete" ]; then
  echo "$out"
  exit 0
fi
fetch_deb fetch-kernel "$KERNEL_PKG" "$KERNEL_PKG_VERSION" "$KERNEL_PKG_SHA256" "$deb"
rm -rf "$out.tmp"
dpkg-deb -x "$deb" "$out.tmp"
rm -rf "$out"
mv "$out.tmp" "$out"
touch "$out/.complete"
echo "$out"
