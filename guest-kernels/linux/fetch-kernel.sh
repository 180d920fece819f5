#!/usr/bin/env bash
# Fetches the Debian cloud kernel package of the first known build still to
# be had (versions.env), checks its sha256, and unpacks it into the asset
# cache, with lucos-build.env (KERNEL_ABI, KERNEL_VERSION, KERNEL_RELEASE)
# beside it. Idempotent. Prints the unpacked directory.
#   guest-kernels/linux/fetch-kernel.sh [CACHE_DIR]
#   guest-kernels/linux/fetch-kernel.sh --which [CACHE_DIR]   # the build, as lucos-build.env lines; fetches nothing
#   guest-kernels/linux/fetch-kernel.sh --other [CACHE_DIR]   # the kernel of another known build (exit 3: none to be had)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
mode=fetch
case "${1:-}" in --which | --other) mode=${1#--}; shift ;; esac
cache=$(asset_cache "${1:-}")
lock_cache "$cache"
choose_build "$cache"

if [ "$mode" = which ]; then
  printf 'KERNEL_ABI=%s\nKERNEL_VERSION=%s\nKERNEL_RELEASE=%s\n' "$BUILD_ABI" "$BUILD_VERSION" "$KERNEL_RELEASE"
  exit 0
fi
if [ "$mode" = other ]; then
  # Another known build's kernel: the first, in the list's order, whose image
  # is to be had (its headers need not be).
  chosen=$BUILD_ABI
  found=""
  for abi in $(known_abis); do
    [ "$abi" = "$chosen" ] && continue
    build_skipped "$abi" && continue
    read -r _ ver _ pkg arch sum < <(known_lines "$abi" | awk '$3 == "image"')
    if deb_cached "$(deb_file "$cache" "$pkg" "$ver" "$arch")" "$sum" || apt_serves "$pkg" "$ver" "$arch" "$sum"; then
      found=$abi
      break
    fi
  done
  if [ -z "$found" ]; then
    echo "fetch-kernel: no other known kernel build's image is to be had" >&2
    exit 3
  fi
  BUILD_ABI=$found BUILD_VERSION=$ver KERNEL_RELEASE=$found-$KERNEL_FLAVOUR
  echo "lucos assets: another build: $KERNEL_RELEASE ($ver)" >&2
fi

if [ ! -f "$cache/linux-image-$KERNEL_RELEASE-$BUILD_VERSION/.complete" ]; then
  list=$(mktemp)
  trap 'rm -f "$list"' EXIT
  if [ "$mode" = other ]; then
    fetch_role "$cache" image > "$list" || { echo "fetch-kernel: fetching the image failed" >&2; exit 1; }
  else
    fetch_chosen "$cache" image "$list" || { echo "fetch-kernel: fetching the image failed" >&2; exit 1; }
  fi
  mapfile -t debs < "$list"
  want=$(known_lines "$BUILD_ABI" | awk '$3 == "image"' | wc -l)
  [ ${#debs[@]} -eq "$want" ] || { echo "fetch-kernel: fetching the image failed" >&2; exit 1; }
  unpack_into "$cache/linux-image-$KERNEL_RELEASE-$BUILD_VERSION" "${debs[@]}"
  finish_unpack "$cache/linux-image-$KERNEL_RELEASE-$BUILD_VERSION"
fi
out="$cache/linux-image-$KERNEL_RELEASE-$BUILD_VERSION"
echo "$out"
