#!/usr/bin/env bash
# Prepares a kbuild tree of the revision before the chosen build, for a
# module fix the chosen build carries: the chosen build's source
# (fetch-source.sh) with FIX reverted, hard-linked into WORK (no copy of the
# files the fix leaves alone), prepared (prepare-tree.sh) with the config
# and release of the other known build OTHER_PKG (an unpacked image
# package, fetch-kernel.sh --other) and its lucos-build.env. `lucos build
# --diff` then checks each replaced function against that build's module
# file, so a wrong reconstruction is refused, not built. Idempotent. Prints
# the prepared tree.
#   guest-kernels/linux/previous-tree.sh FIX OTHER_PKG WORK
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fix=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
other=$2
mkdir -p "$3"
work=$(cd "$3" && pwd)
tree=$(TMPDIR="${TMPDIR:-/tmp}" "$here/fetch-source.sh")
src=$(cd "$tree/source" && pwd -P)
# shellcheck disable=SC1091
. "$other/lucos-build.env"
out="$work/build-$KERNEL_RELEASE"
stamp="$(sha256sum "$fix" | cut -c1-16) $src"
if [ -f "$out/.prepared" ] && [ "$(cat "$work/.from" 2>/dev/null)" = "$stamp" ]; then
  echo "$out"
  exit 0
fi
# Only a folder this script made (or an empty one) is emptied.
if [ -n "$(ls -A "$work")" ] && [ ! -f "$work/.lucos-previous-tree" ] && [ ! -f "$work/.from" ]; then
  echo "previous-tree: $work is not empty and not a tree this script made; give another folder" >&2
  exit 2
fi
rm -rf "$work"
mkdir -p "$work"
touch "$work/.lucos-previous-tree"
cp -al "$src" "$work/src"
# The folders are the copy's own (files are shared: patch writes each file
# it changes anew, so the pristine source stays as it was).
find "$work/src" -type d -exec chmod u+w {} +
patch -R -p1 -s -d "$work/src" -i "$fix" --no-backup-if-mismatch >&2
"$here/prepare-tree.sh" "$work/src" "$out" "$other/boot/config-$KERNEL_RELEASE" \
  "$KERNEL_RELEASE" "$other/lucos-build.env"
echo "$stamp" > "$work/.from"
echo "$out"
