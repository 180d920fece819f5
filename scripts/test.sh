#!/usr/bin/env bash
# The whole lucos test suite: what CI runs (.ci/run), and what a newcomer runs.
#   scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
start=$(date +%s)
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace --no-fail-fast
echo "== suite finished in $(( $(date +%s) - start )) s"
