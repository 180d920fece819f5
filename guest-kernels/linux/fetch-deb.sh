# shellcheck shell=bash
# fetch_deb WHO PKG VERSION SHA256 DEB: makes DEB the package PKG=VERSION
# (apt-get download into DEB's directory unless it is there already with the
# right sha256), and fails loudly on a download error or a sha256 mismatch.
# Sourced by fetch-kernel.sh and fetch-headers.sh, with asset_cache below.
fetch_deb() {
  local who=$1 pkg=$2 version=$3 sum=$4 deb=$5 dir sudo=""
  dir=$(dirname "$deb")
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if [ ! -f "$deb" ] || ! echo "$sum  $deb" | sha256sum -c --status; then
    echo "$who: downloading $pkg=$version" >&2
    (cd "$dir" && apt-get download -q "$pkg=$version" >&2 2>/dev/null) ||
      { $sudo apt-get update -qq >&2 && (cd "$dir" && apt-get download -q "$pkg=$version" >&2 2>/dev/null); } || {
        echo "$who: cannot download $pkg=$version with apt-get" >&2
        return 1
      }
  fi
  if ! echo "$sum  $deb" | sha256sum -c --status; then
    echo "$who: sha256 mismatch for $deb" >&2
    echo "  expected $sum" >&2
    echo "  got      $(sha256sum "$deb" | cut -d' ' -f1)" >&2
    return 1
  fi
}

# asset_cache [DIR]: creates and prints (absolute) the asset cache: DIR, else
# $LUCOS_ASSETS, else target/lucos-assets of this checkout.
asset_cache() {
  local dir=${1:-${LUCOS_ASSETS:-$(dirname "${BASH_SOURCE[0]}")/../../target/lucos-assets}}
  mkdir -p "$dir"
  (cd "$dir" && pwd)
}
