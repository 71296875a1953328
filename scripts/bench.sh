#!/usr/bin/env bash
# Runs the exit-latency benchmark in a release build and keeps its JSON and
# SVG next to each other: scripts/bench.sh [OUT_DIR] [extra vmm bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out}
shift || true
mkdir -p "$out"
cargo build --release -q -p vmm
./target/x86_64-unknown-linux-gnu/release/vmm bench --json "$out/bench.json" --svg "$out/bench.svg" "$@"
echo "wrote $out/bench.json and $out/bench.svg"
