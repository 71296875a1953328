#!/bin/busybox sh
# /init of the hardware-KVM lane's initramfs (built by scripts/hwkvm/run.sh).
# Loads KVM for AMD SVM, then runs the guests and the test binaries against
# /dev/kvm. Lines for the runner start with "HWKVM ": "HWKVM RESULT ok|FAIL
# NAME" per guest and test, "HWKVM END" last; everything else is detail.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
export HOME=/tmp TMPDIR=/tmp VMM_BIN=/t/vmm RUST_BACKTRACE=1
# What the runner's HWKVM_ENV asked for.
[ ! -f /t/env ] || . /t/env

say() { echo "HWKVM $*"; }
result() { say "RESULT $*"; }
finish() {
    say "END"
    sync
    poweroff -f
}

for m in irqbypass kvm ccp kvm-amd; do
    if ! insmod "/lib/modules/$m.ko" 2>/tmp/insmod.err; then
        say "cannot load $m: $(cat /tmp/insmod.err)"
        result "FAIL modules"
        finish
    fi
done
if [ ! -c /dev/kvm ]; then
    say "no /dev/kvm after loading kvm-amd"
    result "FAIL modules"
    finish
fi
say "kernel $(uname -r); $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //');" \
    "kvm_amd npt=$(cat /sys/module/kvm_amd/parameters/npt) nrips=$(cat /sys/module/kvm_amd/parameters/nrips)"
t0=$(date +%s)

# The CPU under the guests, and the stub self-test's verdict on it (the
# tests expect what this CPU does; see tests/tests/kvm_kind.rs).
if [ -x /t/deps/kvm_kind ]; then
    /t/deps/kvm_kind --test-threads=1 --nocapture >/tmp/probe.log 2>&1
    grep -E '^(KVM kind|CPU|  )' /tmp/probe.log | while IFS= read -r l; do say "probe: $l"; done
fi
/t/vmm selftest >/tmp/selftest.log 2>&1
st=$?
sed 's/^/HWKVM selftest: /' /tmp/selftest.log | grep -E 'FAILED|selftest: selftest'
say "selftest: vmm selftest exited $st"

# Every scripted guest through the binary, as a user runs it. CPL 0 runs
# natively here, so a program's native-CPL0 expectation applies.
cd /guests
for g in $(cat list); do
    if [ "$g" = masked-fault-suppression ] && ! grep -qw avx512bw /proc/cpuinfo; then
        say "skipped guest $g: the CPU has no AVX-512BW (its payload needs it)"
        continue
    fi
    want=$g.status
    serial=$g.serial
    if [ -f "$g.native-status" ]; then
        want=$g.native-status
        serial=$g.native-serial
    fi
    set --
    while IFS= read -r a; do set -- "$@" "$a"; done <"$g.args"
    if [ "$g" = spin ]; then
        # Spins until stopped: SIGTERM must end it with status 14.
        /t/vmm run "$@" "$g.bin" >/tmp/g.out 2>/tmp/g.err </dev/null &
        sleep 2
        kill -TERM $!
        wait $!
        st=$?
    else
        timeout 120 /t/vmm run "$@" "$g.bin" >/tmp/g.out 2>/tmp/g.err </dev/null
        st=$?
    fi
    why=""
    if [ "$g" = unsupported-insn ]; then
        # CPL 0 xsaves runs natively here: it completes (33), or the CPU
        # raises #UD where it lacks XSAVES (127); it never stops the VM (10).
        say "guest unsupported-insn: xsaves at CPL 0 ended with status $st"
        case "$st" in 33 | 127) ;; *) why="status $st, expected 33 or 127" ;; esac
    else
        [ "$st" = "$(cat "$want")" ] || why="status $st, expected $(cat "$want")"
        while IFS= read -r line; do
            [ -z "$line" ] || grep -qF -- "$line" /tmp/g.out || why="$why serial lacks '$line'"
        done <"$serial"
    fi
    if [ -z "$why" ]; then
        result "ok guest $g"
    else
        result "FAIL guest $g:$why ($(tail -n1 /tmp/g.err))"
        tail -n 5 /tmp/g.out /tmp/g.err
    fi
done

# Every workspace test binary, one test at a time (one vCPU).
cd /tmp
for n in $(cat /t/tests.list); do
    s=$(date +%s)
    timeout 400 "/t/deps/$n" --test-threads=1 --show-output >"/tmp/$n.log" 2>&1 </dev/null
    st=$?
    sed -n "s/^test \(.*\) \.\.\. ok$/ok $n::\1/p; s/^test \(.*\) \.\.\. FAILED$/FAIL $n::\1/p; s/^test \(.*\) \.\.\. ignored$/ignored $n::\1/p" \
        "/tmp/$n.log" >/tmp/r
    while IFS= read -r l; do
        case "$l" in
        ignored*) say "$l" ;;
        *) result "$l" ;;
        esac
    done </tmp/r
    if [ "$st" != 0 ] && ! grep -q '^FAIL' /tmp/r; then
        result "FAIL $n (the binary exited $st without a failed test: crashed or timed out)"
    fi
    say "time: $n $(($(date +%s) - s))s"
    echo "===== $n (exit $st)"
    cat "/tmp/$n.log"
done

# kvm-unit-tests' emulator test, when the runner was given a build.
if [ -f /kut/emulator.flat ]; then
    timeout 240 /t/vmm run --testdev --cpus 1 --mem 256M --cmdline emulator /kut/emulator.flat \
        >/tmp/kut.log 2>&1 </dev/null
    st=$?
    say "kvm-unit-tests emulator.flat: exit $st, $(grep -c '^PASS' /tmp/kut.log) PASS," \
        "$(grep -c '^FAIL' /tmp/kut.log) FAIL, $(grep -c '^SKIP' /tmp/kut.log) SKIP;" \
        "$(grep -a '^SUMMARY' /tmp/kut.log || echo 'no SUMMARY line')"
    grep -a '^FAIL' /tmp/kut.log | while IFS= read -r l; do say "kvm-unit-tests emulator.flat $l"; done
    echo "===== kvm-unit-tests emulator.flat (exit $st)"
    cat /tmp/kut.log
fi
say "time: all $(($(date +%s) - t0))s"
finish
