#!/usr/bin/env bash
# Runs every x86 test of a built kvm-unit-tests tree under the release vmm,
# the way the tree's x86/unittests.cfg describes it, and prints a summary:
#
#   scripts/run-unit-tests.sh [-t MAX_TIMEOUT] [-o LOGDIR] [-n] DIR [TEST...]
#
# DIR is the built tree (the one holding x86/unittests.cfg and x86/*.flat).
# TEST... restricts the run to those unittests.cfg sections.
#   -t S   cap every test's timeout at S seconds (default: the cfg's, or 90)
#   -o D   keep each test's serial output in D/NAME.log (default: a temp dir)
#   -n     also run the tests of the `nodefault` group
#
# What the cfg says and how it is honoured:
#   smp            --cpus N
#   test_args      appended to the command line (--cmdline "NAME ARGS")
#   timeout        per-test limit (run_tests.sh's default: 90 s)
#   qemu_params    -cpu max/host -> --cpu host (other models: --cpu kvm);
#                  -m SIZE -> --mem; anything else (CPU flags, -machine,
#                  -device) is not applied and listed in the test's log
#   arch = i386    SKIP (an x86_64 build has no such binary)
#   check = F=V    SKIP unless every file F holds V (as run_tests.sh does)
#   groups nodefault  SKIP unless -n (as run_tests.sh does)
#
# A test's status follows kvm-unit-tests' exit codes (isa-debug-exit
# (code << 1) | 1): 1 PASS, 77 SKIP, anything else FAIL; a test still running
# at its timeout is FAIL (timeout). The table also counts the PASS/FAIL/SKIP
# report lines each test printed. The last line is "N passed, N failed"
# (SKIPs counted in neither).
set -uo pipefail

max_timeout=
logdir=
nodefault=0
while getopts "t:o:n" opt; do
    case $opt in
    t) max_timeout=$OPTARG ;;
    o) logdir=$OPTARG ;;
    n) nodefault=1 ;;
    *) echo "usage: $0 [-t MAX_TIMEOUT] [-o LOGDIR] [-n] DIR [TEST...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
dir=${1:?usage: $0 [-t MAX_TIMEOUT] [-o LOGDIR] [-n] DIR [TEST...]}
shift
dir=$(cd "$dir" && pwd) || exit 2
cfg=$dir/x86/unittests.cfg
if [ ! -f "$cfg" ]; then
    echo "$cfg: not found (DIR must be a built kvm-unit-tests tree)" >&2
    exit 2
fi
only=("$@")
# No globbing: test_args such as "ept_access*" are passed as written.
set -f

cd "$(dirname "$0")/.."
cargo build --release -q -p vmm || exit 2
vmm=$PWD/target/x86_64-unknown-linux-gnu/release/vmm
if [ -z "$logdir" ]; then
    logdir=$(mktemp -d /tmp/unit-tests.XXXXXX)
fi
mkdir -p "$logdir"

# One line per cfg section: name<TAB>key=value<TAB>key=value...
# (values keep their inner spaces; surrounding quotes are removed).
sections=$(awk '
    function flush() { if (name != "") print name line; name = ""; line = "" }
    /^[ \t]*#/ || /^[ \t]*$/ { next }
    /^\[.*\]$/ { flush(); name = substr($0, 2, length($0) - 2); next }
    {
        i = index($0, "=")
        if (i == 0) next
        k = $0; sub(/[ \t]*=.*/, "", k)
        v = substr($0, i + 1); sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v)
        if (v ~ /^".*"$/ || v ~ /^'"'"'.*'"'"'$/) v = substr(v, 2, length(v) - 2)
        line = line "\t" k "=" v
    }
    END { flush() }
' "$cfg")

passed=0
failed=0
skipped=0
rows=()

# Counts lines that start with "WORD: " in the log (kvm-unit-tests' report
# lines).
count() { grep -c "^$1: " "$2" 2>/dev/null || true; }

while IFS= read -r rec; do
    [ -n "$rec" ] || continue
    IFS=$'\t' read -r -a fields <<<"$rec"
    name=${fields[0]}
    if [ ${#only[@]} -gt 0 ]; then
        want=0
        for o in "${only[@]}"; do [ "$o" = "$name" ] && want=1; done
        [ $want = 1 ] || continue
    fi
    file= smp=1 args= timeout=90 params= arch= check= groups=
    for f in "${fields[@]:1}"; do
        k=${f%%=*}
        v=${f#*=}
        case $k in
        file) file=$v ;;
        smp) smp=$v ;;
        test_args|extra_params) args=$v ;;
        timeout) timeout=${v%s} ;;
        qemu_params) params=$v ;;
        arch) arch=$v ;;
        check) check=$v ;;
        groups) groups=$v ;;
        esac
    done
    if [ -n "$max_timeout" ] && [ "$timeout" -gt "$max_timeout" ]; then
        timeout=$max_timeout
    fi
    # test_args may hold shell expansions (kvmclock_test: `date +%s`).
    args=$(eval "echo $args" 2>/dev/null || echo "$args")
    log=$logdir/$name.log
    skip_reason=
    if [ -n "$arch" ] && [ "$arch" != x86_64 ]; then
        skip_reason="arch $arch"
    elif [[ " $groups " == *" nodefault "* ]] && [ $nodefault = 0 ]; then
        skip_reason="group nodefault"
    elif [ ! -f "$dir/x86/$file" ]; then
        skip_reason="$file not built"
    else
        for c in $check; do
            path=${c%%=*}
            val=${c#*=}
            if [ "$(cat "$path" 2>/dev/null)" != "$val" ]; then
                skip_reason="$path != $val"
                break
            fi
        done
    fi
    if [ -n "$skip_reason" ]; then
        skipped=$((skipped + 1))
        rows+=("$(printf '%-34s %-6s %5s %5s %5s %7s  %s' "$name" SKIP - - - - "$skip_reason")")
        continue
    fi

    mem=256M cpu=()
    opts=()
    ignored=
    set -- $params
    while [ $# -gt 0 ]; do
        case $1 in
        -cpu)
            case ${2%%,*} in
            max|host) cpu=(--cpu host) ;;
            esac
            [ "${2#*,}" != "$2" ] && ignored+=" -cpu ${2}"
            shift 2 ;;
        -m)
            mem=$2
            case $mem in *[0-9]) mem=${mem}M ;; esac
            mem=${mem^^}
            shift 2 ;;
        -machine)
            ignored+=" -machine $2"
            shift 2 ;;
        *) ignored+=" $1"; shift ;;
        esac
    done
    opts=(--testdev --cpus "$smp" --mem "$mem" "${cpu[@]}" "${opts[@]}")

    start=$(date +%s.%N)
    {
        echo "# $vmm run ${opts[*]} --cmdline \"$file $args\" $dir/x86/$file"
        [ -n "$ignored" ] && echo "# qemu_params not applied:$ignored"
    } >"$log"
    timeout --foreground -k 5 "$timeout" \
        "$vmm" run "${opts[@]}" --cmdline "$file $args" "$dir/x86/$file" \
        </dev/null >>"$log" 2>&1
    rc=$?
    secs=$(echo "$(date +%s.%N) - $start" | bc)
    npass=$(count PASS "$log")
    nfail=$(count FAIL "$log")
    nskip=$(count SKIP "$log")
    case $rc in
    1) status=PASS; passed=$((passed + 1)); why= ;;
    77) status=SKIP; skipped=$((skipped + 1)); why= ;;
    124|137) status=FAIL; failed=$((failed + 1)); why="timeout ${timeout}s" ;;
    *) status=FAIL; failed=$((failed + 1)); why="exit $rc" ;;
    esac
    if [ $status = FAIL ]; then
        # The VMM's own last word (why the VM ended), if it said one.
        last=$(grep -v '^#' "$log" | grep -E 'vcpu [0-9]+:|^Error|error:' | tail -1 | cut -c1-110)
        [ -n "$last" ] && why="$why: $last"
    fi
    rows+=("$(printf '%-34s %-6s %5s %5s %5s %7.1f  %s' "$name" "$status" "$npass" "$nfail" "$nskip" "$secs" "$why")")
    echo "$(printf '%-34s %s' "$name" "$status") ($secs s)" >&2
done <<<"$sections"

printf '%-34s %-6s %5s %5s %5s %7s  %s\n' test status PASS FAIL SKIP secs notes
for r in "${rows[@]}"; do echo "$r"; done
echo "logs in $logdir; $skipped skipped"
echo "$passed passed, $failed failed"
[ $failed = 0 ]
