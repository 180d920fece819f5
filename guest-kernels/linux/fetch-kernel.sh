#!/usr/bin/env bash
# Fetches the pinned Debian cloud kernel package, checks its sha256, and
# unpacks it into the asset cache. Idempotent. Prints the unpacked directory.
#   guest-kernels/linux/fetch-kernel.sh [CACHE_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${1:-${LUCOS_ASSETS:-$here/../../target/lucos-assets}}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
deb="$cache/${KERNEL_PKG}_${KERNEL_PKG_VERSION}_amd64.deb"
out="$cache/$KERNEL_PKG-$KERNEL_PKG_VERSION"

if [ -f "$out/.complete" ]; then
  echo "$out"
  exit 0
fi
if [ ! -f "$deb" ] || ! echo "$KERNEL_PKG_SHA256  $deb" | sha256sum -c --status; then
  echo "fetch-kernel: downloading $KERNEL_PKG=$KERNEL_PKG_VERSION" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  (cd "$cache" && apt-get download -q "$KERNEL_PKG=$KERNEL_PKG_VERSION" >&2 2>/dev/null) ||
    { $SUDO apt-get update -qq >&2 && (cd "$cache" && apt-get download -q "$KERNEL_PKG=$KERNEL_PKG_VERSION" >&2 2>/dev/null); } || {
      echo "fetch-kernel: cannot download $KERNEL_PKG=$KERNEL_PKG_VERSION with apt-get" >&2
      exit 1
    }
fi
if ! echo "$KERNEL_PKG_SHA256  $deb" | sha256sum -c --status; then
  echo "fetch-kernel: sha256 mismatch for $deb" >&2
  echo "  expected $KERNEL_PKG_SHA256" >&2
  echo "  got      $(sha256sum "$deb" | cut -d' ' -f1)" >&2
  exit 1
fi
rm -rf "$out.tmp"
dpkg-deb -x "$deb" "$out.tmp"
rm -rf "$out"
mv "$out.tmp" "$out"
touch "$out/.complete"
echo "$out"
