#!/usr/bin/env bash
# Runs one kvm-unit-tests x86 kernel the way its run scripts expect:
#   scripts/run-unit-test.sh KERNEL [SMP] [ARGS...]
# Serial output goes to stdout; the exit status is isa-debug-exit's
# (code << 1) | 1, so 1 means the test passed.
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=${1:?usage: run-unit-test.sh KERNEL [SMP] [ARGS...]}
smp=${2:-1}
shift $(( $# >= 2 ? 2 : 1 ))
cargo build --release -q -p vmm
exec ./target/x86_64-unknown-linux-gnu/release/vmm run --testdev --cpus "$smp" --mem 256M \
    --cmdline "$(basename "$kernel") $*" "$kernel"
