#!/usr/bin/env bash
# Prepares a kbuild output tree TREE for the kernel source SRC with a
# build's own CONFIG and release (Debian's ABI name, as `uname -r` gives
# it): `make O=TREE olddefconfig prepare modules_prepare` with the
# kernel's compiler (checked against the config's CONFIG_CC_VERSION_TEXT),
# the config's signing-key options emptied (a patch object signs nothing).
# ENV (lucos-build.env: KERNEL_VERSION and friends) is copied into it, so
# `lucos build --diff` can check the source version. Redone from scratch;
# TREE/.prepared marks it whole. fetch-source.sh uses it for the pinned
# source; tests use it for a source they derive from it.
#   guest-kernels/linux/prepare-tree.sh SRC TREE CONFIG RELEASE ENV
set -euo pipefail
src=$1 tree=$2 config=$3 release=$4 env=$5
# make -C reads O= from inside the source: an absolute path.
case "$tree" in /*) ;; *) tree=$PWD/$tree ;; esac
[ -f "$config" ] || { echo "prepare-tree: no $config" >&2; exit 1; }
want_cc=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\(.*\)"$/\1/p' "$config")
have_cc=$(gcc-12 --version 2>/dev/null | head -n 1 || true)
[ "$want_cc" = "$have_cc" ] || {
  echo "prepare-tree: the kernel was built with '$want_cc'; gcc-12 here is '${have_cc:-missing}' (scripts/setup.sh test installs it)" >&2
  exit 1
}
echo "lucos assets: preparing $tree (config $release, $want_cc)" >&2
# Prepared in place (its files name its path); .prepared marks it whole.
rm -rf "$tree"
mkdir -p "$tree"
cp "$config" "$tree/.config"
# KCFLAGS as lucos build --diff gives them (objects built with a flag the
# prepared parts were not rebuild those parts first).
kmake() {
  make -s -C "$src" O="$tree" CC=gcc-12 HOSTCC=gcc-12 KERNELRELEASE="$release" \
    KCFLAGS="-ffunction-sections -fdata-sections" "$@" >&2
}
# Debian's config names its signing keys and certificates; a patch object
# needs none of them. (scripts/config edits the file as it is; one
# olddefconfig then settles it.)
"$src/scripts/config" --file "$tree/.config" \
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
cp "$env" "$tree/lucos-build.env"
touch "$tree/.prepared"
