#!/usr/bin/env bash
# Extracts the uncompressed vmlinux (ELF, with its PVH entry note) from a
# bzImage, using the payload offset and length in the boot protocol header.
#   guest-kernels/linux/extract-vmlinux.sh BZIMAGE OUT
set -euo pipefail
in=$1 out=$2
u8() { od -An -tu1 -j "$1" -N1 "$in" | tr -d ' '; }
u32() { od -An -tu4 -j "$1" -N4 "$in" | tr -d ' '; }
setup_sects=$(u8 $((0x1f1)))
[ "$setup_sects" -eq 0 ] && setup_sects=4
payload_offset=$(u32 $((0x248)))
payload_length=$(u32 $((0x24c)))
start=$(( (setup_sects + 1) * 512 + payload_offset ))
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
dd if="$in" of="$tmp" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$payload_length" status=none
magic=$(od -An -tx1 -N4 "$tmp" | tr -d ' ')
case "$magic" in
  02214c18) lz4 -dc "$tmp" > "$out" 2>/dev/null || [ -s "$out" ] ;;   # LZ4 legacy frame
  fd377a58) xz -dc "$tmp" > "$out" 2>/dev/null || [ -s "$out" ] ;;
  28b52ffd) zstd -dc "$tmp" > "$out" ;;
  1f8b08*) gzip -dc "$tmp" > "$out" 2>/dev/null || [ -s "$out" ] ;;
  *) echo "extract-vmlinux: unknown payload compression (magic $magic)" >&2; exit 1 ;;
esac
if [ "$(od -An -c -N4 "$out" | tr -d ' ')" != "177ELF" ]; then
  echo "extract-vmlinux: the payload did not decompress to an ELF file" >&2
  exit 1
fi
