#!/usr/bin/env bash
# Fetches the pinned kbuild tree of the Debian guest kernel (linux-headers for
# the cloud flavour, its common part, and linux-kbuild: same version as the
# kernel, each sha256-checked), unpacks them into one tree in the asset cache,
# and points the flavour's Makefile at the unpacked common part instead of
# /usr/src. Idempotent. Prints the kbuild directory for `lucos build --kbuild`.
#   guest-kernels/linux/fetch-headers.sh [CACHE_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
# shellcheck source=fetch-deb.sh
. "$here/fetch-deb.sh"
cache=$(asset_cache "${1:-}")
root="$cache/linux-headers-$KERNEL_PKG_VERSION"
kbuild="$root/usr/src/linux-headers-$KERNEL_RELEASE"

# Done already, unless the cache moved (the Makefile names its own path).
if [ -f "$root/.complete" ] && grep -q "^include $root/" "$kbuild/Makefile"; then
  echo "$kbuild"
  exit 0
fi
debs=()
for spec in $HEADERS_PKGS; do
  pkg=${spec%%:*} arch=${spec##*:}
  var="HEADERS_SHA256_$(echo "$pkg" | tr .- __)"
  sum=${!var}
  deb="$cache/${pkg}_${KERNEL_PKG_VERSION}_${arch}.deb"
  fetch_deb fetch-headers "$pkg" "$KERNEL_PKG_VERSION" "$sum" "$deb"
  debs+=("$deb")
done
rm -rf "$root.tmp"
mkdir -p "$root.tmp"
for deb in "${debs[@]}"; do
  dpkg-deb -x "$deb" "$root.tmp"
done
common="/usr/src/linux-headers-${KERNEL_RELEASE%-cloud-amd64}-common"
mk="$root.tmp/usr/src/linux-headers-$KERNEL_RELEASE/Makefile"
grep -q "^include $common/Makefile" "$mk" || {
  echo "fetch-headers: $mk does not include $common/Makefile as expected" >&2
  exit 1
}
sed -i "s|^include $common/Makefile|include $root$common/Makefile|" "$mk"
rm -rf "$root"
mv "$root.tmp" "$root"
touch "$root/.complete"
echo "$kbuild"
