#!/usr/bin/env bash
# Fetches the kernel source of the chosen Debian kernel build (the build
# fetch-kernel.sh takes: linux-source-6.1 of the same source version,
# sha256-checked), unpacks it pristine, and prepares a kbuild output tree
# beside it with that build's own config (the image package's
# /boot/config-RELEASE) and compiler: `make O=... olddefconfig prepare
# modules_prepare`. Idempotent and cached. Prints the prepared tree, the
# --source of `lucos build --diff`; the pristine source is its `source`
# link.
#   guest-kernels/linux/fetch-source.sh [CACHE_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
cache=$(asset_cache "${1:-}")
lock_cache "$cache"
image=$("$here/fetch-kernel.sh" "$cache")
choose_build "$cache"
[ "$image" = "$cache/linux-image-$KERNEL_RELEASE-$BUILD_VERSION" ] || {
  echo "fetch-source: the kernel fetched ($image) is not build $KERNEL_RELEASE" >&2
  exit 1
}
root="$cache/linux-source-$BUILD_VERSION"
tree="$root/build-$KERNEL_RELEASE"
if [ -f "$root/.complete" ] && [ -f "$tree/.prepared" ]; then
  echo "$tree"
  exit 0
fi

if [ ! -f "$root/.complete" ]; then
  list=$(mktemp)
  trap 'rm -f "$list"' EXIT
  fetch_chosen "$cache" source "$list" || { echo "fetch-source: fetching linux-source failed" >&2; exit 1; }
  mapfile -t debs < "$list"
  [ ${#debs[@]} -eq 1 ] || { echo "fetch-source: expected one source package, got ${#debs[@]}" >&2; exit 1; }
  unpack_into "$root" "${debs[0]}"
  tarball=$(find "$root.tmp/usr/src" -maxdepth 1 -name 'linux-source-*.tar.xz' | head -n 1)
  [ -n "$tarball" ] || { rm -rf "$root.tmp"; echo "fetch-source: no linux-source tarball in ${debs[0]}" >&2; exit 1; }
  echo "lucos assets: unpacking $(basename "$tarball")" >&2
  mkdir -p "$root.tmp/src"
  tar -xJf "$tarball" -C "$root.tmp/src" --strip-components=1
  rm -rf "$root.tmp/usr"
  # The pristine tree is read-only: builds happen in output trees.
  chmod -R a-w "$root.tmp/src"
  finish_unpack "$root"
fi

# The build's config, from its image package; prepared as Debian's build
# prepared it, in an output tree (the source stays pristine).
"$here/prepare-tree.sh" "$root/src" "$tree" "$image/boot/config-$KERNEL_RELEASE" \
  "$KERNEL_RELEASE" "$root/lucos-build.env"
echo "$tree"
