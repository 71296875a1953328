#!/usr/bin/env bash
# Whole-process start-up of a trivial guest: `vmm run` against
# bare-kvm-loop.c running the same image (hello-long: 31 COM1 writes, then
# isa-debug-exit), in alternating runs, wall clock from fork to exit.
#   scripts/startup.sh [RUNS]      (default 60)
# Prints each side's median and minimum and the ratio of the medians (the
# target in issue 11 is 2x). Both binaries run from one scratch directory:
# a binary the linker has just written runs measurably slower here than a
# copy of it.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-60}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cargo build --release -q -p vmm -p guest
bin=target/x86_64-unknown-linux-gnu/release
cc -O2 -o "$work/bare-kvm-loop" scripts/bare-kvm-loop.c
cp "$bin/vmm" "$work/vmm"
"$bin/guest" hello-long "$work/hello.bin" >/dev/null

# The VMM's command line for the image, as the guest tool prints it.
vmm_cmd=("$work/vmm" run --mode long --load-addr 0x100000 --format flat "$work/hello.bin")
bare_cmd=("$work/bare-kvm-loop" "$work/hello.bin")
# Both must end as the guest asks (status 33) before anything is timed.
for c in vmm bare; do
    declare -n cmd="${c}_cmd"
    st=0
    "${cmd[@]}" >/dev/null 2>&1 || st=$?
    [ "$st" = 33 ] || { echo "startup: $c exited with $st, not 33" >&2; exit 1; }
done

usec() { # EPOCHREALTIME (seconds.micros) to microseconds
    local s=${1%.*} f=${1#*.}
    echo $((10#$s * 1000000 + 10#$f))
}
: >"$work/vmm.t"
: >"$work/bare.t"
for ((i = 0; i < runs; i++)); do
    for c in bare vmm; do
        declare -n cmd="${c}_cmd"
        t0=$EPOCHREALTIME
        "${cmd[@]}" >/dev/null 2>&1 || true
        t1=$EPOCHREALTIME
        echo $(($(usec "$t1") - $(usec "$t0"))) >>"$work/$c.t"
    done
done

median() { sort -n "$1" | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : int((v[NR/2]+v[NR/2+1])/2)}'; }
minimum() { sort -n "$1" | head -n1; }
bm=$(median "$work/bare.t")
vm=$(median "$work/vmm.t")
printf 'bare-kvm-loop  median %6d us  min %6d us\n' "$bm" "$(minimum "$work/bare.t")"
printf 'vmm run        median %6d us  min %6d us\n' "$vm" "$(minimum "$work/vmm.t")"
awk -v v="$vm" -v b="$bm" -v n="$runs" 'BEGIN {printf "ratio %.2f over %d alternating runs (target 2x)\n", v / b, n}'
