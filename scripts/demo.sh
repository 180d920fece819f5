#!/usr/bin/env bash
# The lucos main job on defaults: boot the bundled test kernel, pause it while
# it runs, show what every vCPU was doing, live-patch it, revert, stop it.
# Installs only what that needs (a compiler and binutils); no Linux assets.
#   scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
cargo run --release --quiet -- demo
