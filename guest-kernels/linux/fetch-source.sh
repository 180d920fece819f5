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
config="$image/boot/config-$KERNEL_RELEASE"
[ -f "$config" ] || { echo "fetch-source: no $config" >&2; exit 1; }
want_cc=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\(.*\)"$/\1/p' "$config")
have_cc=$(gcc-12 --version 2>/dev/null | head -n 1 || true)
[ "$want_cc" = "$have_cc" ] || {
  echo "fetch-source: the kernel was built with '$want_cc'; gcc-12 here is '${have_cc:-missing}' (scripts/setup.sh test installs it)" >&2
  exit 1
}
echo "lucos assets: preparing $tree (config $KERNEL_RELEASE, $want_cc)" >&2
# Prepared in place (its files name its path); .prepared marks it whole.
rm -rf "$tree"
mkdir -p "$tree"
cp "$config" "$tree/.config"
# Debian's config names its signing keys and certificates; a patch object
# needs none of them.
# KCFLAGS as lucos build --diff gives them (objects built with a flag the
# prepared parts were not rebuild those parts first).
kmake() {
  make -s -C "$root/src" O="$tree" CC=gcc-12 HOSTCC=gcc-12 KERNELRELEASE="$KERNEL_RELEASE" \
    KCFLAGS="-ffunction-sections -fdata-sections" "$@" >&2
}
kmake olddefconfig
"$root/src/scripts/config" --file "$tree/.config" \
  --set-str SYSTEM_TRUSTED_KEYS "" --set-str SYSTEM_REVOCATION_KEYS "" \
  --set-str MODULE_SIG_KEY "certs/signing_key.pem" >&2
kmake olddefconfig
# KERNELRELEASE: Debian's ABI name, as the running kernel has it (uname -r);
# include/config/kernel.release keeps it for lucos build.
kmake -j"$(nproc)" prepare modules_prepare
# One object, so the tools the first object build makes (resolve_btfids,
# the generated headers) are made here, once; the object goes again.
kmake lib/ctype.o
rm -f "$tree/lib/ctype.o" "$tree/lib/.ctype.o.cmd"
cp "$root/lucos-build.env" "$tree/lucos-build.env"
touch "$tree/.prepared"
echo "$tree"
