# shellcheck shell=bash
# Shared by the fetch scripts: the asset cache, the known kernel builds of
# versions.env, choosing the build to use, and fetching its packages, each
# checked by sha256. Sourced, never run.
#
# A build is "to be had" when every package of the roles the fetchers use
# (LUCOS_NEEDED_ROLES, default "image headers source": the kernel, its kbuild
# tree and its source for `lucos build --diff`, so every fetcher chooses the
# same build) is in the cache with its sha256 or served with it.
#
# Test hook: LUCOS_SKIP_BUILDS="ABI [ABI...]" (or "all") treats those known
# builds as not to be had, as if the archive had dropped them; tests/assets.rs
# also puts a stub apt-get serving packages it made on PATH.

LUCOS_LINUX_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Test hook: LUCOS_VERSIONS_ENV=FILE reads the known builds from FILE.
# shellcheck source=versions.env
. "${LUCOS_VERSIONS_ENV:-$LUCOS_LINUX_DIR/versions.env}"

_sudo=""
[ "$(id -u)" -ne 0 ] && _sudo="sudo"
_apt_updated=0

# asset_cache [DIR]: creates and prints (absolute) the asset cache: DIR, else
# $LUCOS_ASSETS, else target/lucos-assets of this checkout.
asset_cache() {
  local dir=${1:-${LUCOS_ASSETS:-$LUCOS_LINUX_DIR/../../target/lucos-assets}}
  mkdir -p "$dir"
  (cd "$dir" && pwd)
}

# lock_cache CACHE: waits for, then holds until the script exits, a lock on
# the cache folder itself (flock(1) of the folder: no file is left), so
# fetchers run at once (tests running side by side, a set-up beside a test)
# take turns instead of unpacking into the same place. A script run by one
# that holds it (exported LUCOS_ASSETS_LOCKED) does not wait for it.
lock_cache() {
  [ "${LUCOS_ASSETS_LOCKED:-}" = "$1" ] && return 0
  exec 9< "$1"
  if ! flock -n 9; then
    echo "lucos assets: waiting for another fetch into $1" >&2
    flock 9
  fi
  export LUCOS_ASSETS_LOCKED=$1
}

# known_lines [ABI]: the package lines of KNOWN_BUILDS (of one build).
known_lines() {
  echo "$KNOWN_BUILDS" | awk -v abi="${1:-}" 'NF == 6 && $1 !~ /^#/ && (abi == "" || $1 == abi)'
}

# known_abis: the known builds' ABIs, most preferred first.
known_abis() {
  known_lines | awk '!seen[$1]++ { print $1 }'
}

# build_skipped ABI: whether the test hook LUCOS_SKIP_BUILDS names ABI.
build_skipped() {
  [ "${LUCOS_SKIP_BUILDS:-}" = all ] && return 0
  case " ${LUCOS_SKIP_BUILDS:-} " in *" $1 "*) return 0 ;; esac
  return 1
}

# apt_refresh: apt-get update, once per script run.
apt_refresh() {
  [ "$_apt_updated" = 1 ] && return 0
  _apt_updated=1
  echo "lucos assets: apt-get update" >&2
  $_sudo apt-get update -qq >&2 || echo "lucos assets: warning: apt-get update failed" >&2
}

# deb_file CACHE PKG VERSION ARCH: where that package's .deb lives in the cache.
deb_file() {
  echo "$1/${2}_${3}_${4}.deb"
}

# deb_cached DEB SHA256: DEB is in the cache with that sha256. The check is
# remembered in DEB.sha256 (newer than DEB), so a large file is hashed once.
deb_cached() {
  local deb=$1 sum=$2
  [ -f "$deb" ] || return 1
  if [ -f "$deb.sha256" ] && [ "$deb.sha256" -nt "$deb" ] && [ "$(cat "$deb.sha256")" = "$sum" ]; then
    return 0
  fi
  echo "$sum  $deb" | sha256sum -c --status || return 1
  echo "$sum" > "$deb.sha256"
}

# apt_index: what apt's signed indices say of every known package (one
# `apt-get download --print-uris` for all: URI, file name, size, SHA256),
# remembered in a file keyed by the state of apt's lists, so a script run
# asks apt once, and later runs only after an apt-get update.
_apt_index=""
apt_index() {
  local key memo pairs
  [ -n "$_apt_index" ] && return 0
  pairs=$(known_lines | awk '{ print $4 "=" $2 }' | sort -u)
  key=$( (ls -l --time-style=+%s /var/lib/apt/lists/ 2>/dev/null; echo "$pairs") | md5sum | cut -c1-16)
  memo="${TMPDIR:-/tmp}/lucos-apt-index.$key"
  if [ -s "$memo" ]; then
    _apt_index=$(cat "$memo")
    return 0
  fi
  # shellcheck disable=SC2086 # one word a package
  _apt_index=$(apt-get download --print-uris $pairs 2>/dev/null || true)
  if [ -z "$_apt_index" ]; then
    apt_refresh
    # shellcheck disable=SC2086
    _apt_index=$(apt-get download --print-uris $pairs 2>/dev/null || true)
  fi
  [ -n "$_apt_index" ] && echo "$_apt_index" > "$memo.$$" && mv "$memo.$$" "$memo"
  return 0
}

# apt_serves PKG VERSION ARCH SHA256: the archive offers PKG=VERSION with
# exactly that sha256.
apt_serves() {
  apt_index
  grep -q " ${1}_${2}_${3}\.deb [0-9]* SHA256:$4\$" <<<"$_apt_index"
}

# choose_build CACHE: sets BUILD_ABI, BUILD_VERSION and KERNEL_RELEASE to the
# first known build whose every package is to be had, and says on stderr
# which one and why any before it was passed over. Without one, prints what
# is missing and what the archive offers now, and returns 1; nothing is
# written to the cache either way.
choose_build() {
  local cache=$1 abi version missing passed="" abi_ ver_ role pkg arch sum
  for abi in $(known_abis); do
    if build_skipped "$abi"; then
      passed+="  $abi: skipped (LUCOS_SKIP_BUILDS test hook)"$'\n'
      continue
    fi
    missing="" version=""
    while read -r abi_ ver_ role pkg arch sum; do
      version=$ver_
      case " ${LUCOS_NEEDED_ROLES:-image headers source} " in *" $role "*) ;; *) continue ;; esac
      deb_cached "$(deb_file "$cache" "$pkg" "$ver_" "$arch")" "$sum" && continue
      apt_serves "$pkg" "$ver_" "$arch" "$sum" || missing+=" $pkg=$ver_"
    done < <(known_lines "$abi")
    if [ -z "$missing" ]; then
      BUILD_ABI=$abi BUILD_VERSION=$version KERNEL_RELEASE=$abi-$KERNEL_FLAVOUR
      if [ -n "$passed" ]; then
        printf 'lucos assets: known kernel builds passed over:\n%s' "$passed" >&2
      fi
      echo "lucos assets: using Debian kernel build $KERNEL_RELEASE ($version)" >&2
      return 0
    fi
    passed+="  $abi ($version): not to be had:$missing"$'\n'
  done
  {
    echo "lucos assets: error: no known Debian kernel build can be fetched completely"
    printf '%s' "$passed"
    echo "The archive offers now:"
    apt_offers | sed 's/^/  /' || true
    echo "To add one to versions.env's list (versions and sha256 from apt's signed indices):"
    echo "  guest-kernels/linux/record-build.sh ABI"
  } >&2
  return 1
}

# apt_offers: the builds of the flavour the archive serves now, one a line
# ("ABI (VERSION)"), from the flavour's metapackage.
apt_offers() {
  { apt-cache show "linux-image-$KERNEL_FLAVOUR" 2>/dev/null || true; } |
    sed -n "s/^Depends: linux-image-\([0-9.-]*\)-$KERNEL_FLAVOUR (= \(.*\))\$/\1 (\2)/p"
}

# fetch_role CACHE ROLE: makes every ROLE package of the chosen build a
# checked .deb in the cache and prints their paths, one a line. A download
# goes to a scratch folder first, so the cache never holds a partial file.
fetch_role() {
  local cache=$1 want=$2 abi_ ver_ role pkg arch sum deb tmp
  while read -r abi_ ver_ role pkg arch sum; do
    [ "$role" = "$want" ] || continue
    deb=$(deb_file "$cache" "$pkg" "$ver_" "$arch")
    if ! deb_cached "$deb" "$sum"; then
      echo "lucos assets: downloading $pkg=$ver_" >&2
      tmp=$(mktemp -d "$cache/.download.XXXXXX")
      # shellcheck disable=SC2064 # $tmp now, on purpose
      trap "rm -rf '$tmp'" INT TERM
      if ! (cd "$tmp" && apt-get download -q "$pkg=$ver_" >&2); then
        apt_refresh
        (cd "$tmp" && apt-get download -q "$pkg=$ver_" >&2) || {
          rm -rf "$tmp"
          echo "lucos assets: cannot download $pkg=$ver_ with apt-get" >&2
          return 1
        }
      fi
      if ! echo "$sum  $tmp/$(basename "$deb")" | sha256sum -c --status; then
        echo "lucos assets: sha256 mismatch for $(basename "$deb")" >&2
        echo "  expected $sum" >&2
        echo "  got      $(sha256sum "$tmp"/*.deb | cut -d' ' -f1)" >&2
        rm -rf "$tmp"
        return 1
      fi
      mv "$tmp/$(basename "$deb")" "$deb"
      rm -rf "$tmp"
      trap - INT TERM
      echo "$sum" > "$deb.sha256"
    fi
    echo "$deb"
  done < <(known_lines "$BUILD_ABI")
}

# fetch_chosen CACHE ROLE OUTFILE: fetch_role of the chosen build into
# OUTFILE (its .deb paths). If a download fails, the archive may have dropped
# the package since apt's lists were read: refresh them, choose again, and
# try once more (the caller re-reads BUILD_ABI and friends).
fetch_chosen() {
  local cache=$1 role=$2 out=$3
  fetch_role "$cache" "$role" > "$out" && return 0
  echo "lucos assets: refreshing apt's lists and choosing the build again" >&2
  _apt_updated=0
  apt_refresh
  _apt_index=""
  choose_build "$cache" || return 1
  fetch_role "$cache" "$role" > "$out"
}

# unpack_into OUT DEB...: unpacks the packages into OUT (through OUT.tmp, so
# OUT is whole or absent) with a lucos-build.env naming the build.
unpack_into() {
  local out=$1 deb
  shift
  rm -rf "$out.tmp"
  mkdir -p "$out.tmp"
  for deb in "$@"; do
    dpkg-deb -x "$deb" "$out.tmp"
  done
  cat > "$out.tmp/lucos-build.env" <<EOF
KERNEL_ABI=$BUILD_ABI
KERNEL_VERSION=$BUILD_VERSION
KERNEL_RELEASE=$KERNEL_RELEASE
EOF
}

# finish_unpack OUT: puts the unpacked OUT.tmp in place as OUT, complete.
finish_unpack() {
  rm -rf "$1"
  mv "$1.tmp" "$1"
  touch "$1/.complete"
}
