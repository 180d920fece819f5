#!/usr/bin/env bash
# Fetches the kbuild tree of the chosen Debian kernel build (the same build
# fetch-kernel.sh takes: linux-headers of the cloud flavour, its common part
# and linux-kbuild of the same source version, each sha256-checked), unpacks
# them into one tree in the asset cache, and points the flavour's Makefile at
# the unpacked common part instead of /usr/src. Idempotent. Prints the kbuild
# directory for `lucos build --kbuild`.
#   guest-kernels/linux/fetch-headers.sh [CACHE_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
cache=$(asset_cache "${1:-}")
lock_cache "$cache"
choose_build "$cache"
root="$cache/linux-headers-$KERNEL_RELEASE-$BUILD_VERSION"
kbuild="$root/usr/src/linux-headers-$KERNEL_RELEASE"

# Done already, unless the cache moved (the Makefile names its own path).
if [ -f "$root/.complete" ] && grep -q "^include $root/" "$kbuild/Makefile"; then
  echo "$kbuild"
  exit 0
fi
list=$(mktemp)
trap 'rm -f "$list"' EXIT
fetch_chosen "$cache" headers "$list" || { echo "fetch-headers: fetching the headers failed" >&2; exit 1; }
# The choice may have changed (fetch_chosen chooses again after a failure).
root="$cache/linux-headers-$KERNEL_RELEASE-$BUILD_VERSION"
kbuild="$root/usr/src/linux-headers-$KERNEL_RELEASE"
mapfile -t debs < "$list"
[ ${#debs[@]} -eq "$(known_lines "$BUILD_ABI" | awk '$3 == "headers"' | wc -l)" ] ||
  { echo "fetch-headers: fetching the headers failed" >&2; exit 1; }
unpack_into "$root" "${debs[@]}"
common="/usr/src/linux-headers-$BUILD_ABI-common"
mk="$root.tmp/usr/src/linux-headers-$KERNEL_RELEASE/Makefile"
grep -q "^include $common/Makefile" "$mk" || {
  rm -rf "$root.tmp"
  echo "fetch-headers: $mk does not include $common/Makefile as expected" >&2
  exit 1
}
sed -i "s|^include $common/Makefile|include $root$common/Makefile|" "$mk"
finish_unpack "$root"
echo "$kbuild"
