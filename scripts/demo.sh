#!/usr/bin/env bash
# The lucos main job on defaults: boot the bundled test kernel, pause it while
# it runs, show what every vCPU was doing, resume it and let it finish.
#   scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo run --release --quiet -- demo
