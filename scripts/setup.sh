#!/usr/bin/env bash
# Installs what lucos needs on a Debian 12 (bookworm) machine. Idempotent:
# run it as often as you like; it only installs what is missing.
#   scripts/setup.sh demo   # the demo: a compiler and binutils for the test kernel
#   scripts/setup.sh test   # the whole suite: the demo's, plus the Linux-guest assets
#
# Needs: root (or sudo), and a Rust toolchain (rustup; see README.md).
set -euo pipefail
profile=${1:-test}
case "$profile" in demo | test) ;; *) echo "usage: scripts/setup.sh demo|test" >&2; exit 2 ;; esac

# Debian packages, with the versions this project is tested with (bookworm).
# apt installs the archive's current bookworm version (without recommends);
# the check below warns if that is not the tested one.
declare -A PKGS=(
  [gcc]="4:12.2.0-3"        # builds the test kernel
  [make]="4.3-4.1"
  [binutils]="2.40-2"       # ld and objcopy for the test kernel
)
if [ "$profile" = test ]; then
  PKGS+=(
    [gcc-12]="12.2.0-14+deb12u1"  # the Debian kernel's compiler: kbuild of Linux live patches
    [libelf1]="0.188-2.1"     # objtool, run by kbuild
    [qemu-system-x86]="1:7.2+dfsg-7+deb12u18+b3"  # the emulated SVM host for Linux-guest tests
    [busybox-static]="1:1.35.0-4+deb12u1+b1"      # guest and emulated-host initramfs
    [cpio]="2.13+dfsg-7.1"
    [lz4]="1.9.4-1"           # unpacks the vmlinux inside the bzImage (PVH boot test)
    # lucos build --diff: the kernel source's own build (fetch-source.sh
    # prepares it; objtool and the host tools of kbuild need these).
    [flex]="2.6.4-8.2"
    [bison]="2:3.8.2+dfsg-1+b1"
    [libelf-dev]="0.188-2.1"
    [libssl-dev]="3.0.19-1~deb12u2"
    [bc]="1.07.1-3+b1"
    [patch]="2.7.6-7"
    [xz-utils]="5.4.1-1"
    [ansible-core]="2.14.18-0+deb12u2"  # tests/ansible.rs: the examples/ansible role over two local hosts
  )
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${!PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
for p in "${!PKGS[@]}"; do
  have=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || true)
  if [ "$have" != "${PKGS[$p]}" ]; then
    echo "setup: note: $p is $have here; lucos is tested with ${PKGS[$p]}" >&2
  fi
done

if [ "$profile" = test ]; then
  # The Debian kernel for Linux guests and the emulated host, of the first
  # known build still to be had (sha256-checked, cached; it says which).
  "$(dirname "$0")/../guest-kernels/linux/fetch-kernel.sh" >/dev/null
  # Its kbuild tree (linux-headers), for Linux live patches built by `lucos build --kbuild`.
  "$(dirname "$0")/../guest-kernels/linux/fetch-headers.sh" >/dev/null
  # Its source, prepared, for patches built from source diffs (`lucos build --diff`).
  "$(dirname "$0")/../guest-kernels/linux/fetch-source.sh" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: error: no Rust toolchain (cargo) found. Install rustup with Rust 1.85 or newer:" >&2
  echo "       https://rustup.rs, then re-run this script." >&2
  exit 1
fi

if [ ! -e /dev/kvm ]; then
  echo "setup: warning: /dev/kvm does not exist: lucos cannot run VMs on this machine," >&2
  echo "       and the test suite will fail (on purpose) where it needs KVM." >&2
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  echo "setup: warning: /dev/kvm is not read-write for $(id -un): add yourself to group kvm." >&2
fi
