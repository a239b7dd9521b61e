#!/usr/bin/env bash
# The GPU checks and benchmarks, made to survive a machine this repository has never seen and to fit a short
# lease (450 s in all by default: inside the 8 minutes a lent H200 gives it).
#
#   bash Benchmarks/gpu/run.sh                on a machine with a CUDA GPU and nvcc; no Swift needed
#   bash Benchmarks/gpu/run.sh --emulation    the same stages on the kernels' CPU emulation (what CI runs)
#   options: --stages a,b,...  only these stages (the others are reported as not selected)
#            --budget S        seconds for the whole run (default 450 on a GPU, 1500 on the emulation)
#
# Stages, in this order, each with its own time limit (cut to what is left of the run's budget):
#   machine       the GPUs, driver, nvcc, host compiler and C++ runtimes (logs/machine.txt)       no Swift
#   build         `make cuda` for the GPU's own architecture and the kernel test program          no Swift
#                 (emulation: `make emu` and the test program)
#   kernel-tests  every kernel against its scalar reference: `make test-cuda` (emulation: `make test`,
#                 the kernel harness under four thread schedules)                                 no Swift
#   bundle        dist/gpu/ (unpacked from dist/gpu.tar.xz, made by Benchmarks/gpu/package.sh): relora starts
#                 (emulation: .build/debug, or DIST)
#   selftest      `relora selftest --device cuda`: every backend op in f32 and bf16, training steps vs the CPU
#   bench         `relora-bench gpu`: quantized linear vs cuBLAS, dequantize/merge bandwidth, AdamW, 1b training
#                 steps (on the emulation every shape is shrunk: a code-path check)
# The stages that need no Swift come first and need no bundle; without one they still run, and the Swift
# stages are reported as skipped with the reason. Every stage writes its log and its one-line result even
# when an earlier one failed; a stage whose prerequisite failed (no library after a failed build) is skipped
# with that reason. A failing GPU stage (not one that timed out) runs once more with CUDA_LAUNCH_BLOCKING=1,
# so that a kernel's fault is reported under the op that launched it, not at the next synchronize; both logs
# are kept, and its summary line quotes the first error line (the rerun's when it failed too).
#
# $OUT (default ./gpu-results) gets three files, rewritten after every stage, so that a run stopped from
# outside still leaves what it had (the device tool brings back at most 8 files):
#   summary.txt    one line per stage, then the totals;
#   results.json   {"mode", "budget_seconds", "seconds", "stages": [{"name", "status", "seconds", "exit",
#                  "limit_seconds", "log", "first_error", "reason", "rerun", "figures"}], ...}; status is pass,
#                  fail, timeout, skipped (could not run: counts as a failure) or n/a (not applicable here:
#                  not selected, too few GPUs);
#   logs.tar.gz    logs/: every stage's log (and its rerun's), machine.txt, ptxas_report.txt, selftest.json,
#                  bench.json.
# Exit status: 0 when every stage passed or was not applicable, 1 otherwise.
#
# The environment: the kernels are built and tested with the machine's own compilers and libraries; only the
# Swift stages get LD_LIBRARY_PATH, pointing at the bundle's libraries (OpenBLAS, its Fortran runtime, zstd).
# The bundle also carries the packaging machine's C++ runtime (libstdc++, libgcc_s); the Swift stages get it
# only when it is newer than the machine's (see swift_libraries). Variables: OUT, DIST (the bundle),
# CUDA_HOME (else nvcc on PATH, /usr/local/cuda, or python3's nvidia/cu13 wheels), RELORA_CUDA_LIB (kept
# when set: the library the Swift stages load), STRICT=1 (warnings and spills fatal, as in CI; default 0:
# reported, not fatal), EXTRA_WARNINGS (host warning flags added to every compile), RELORA_JOBS (make -j).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

# ---- options ---------------------------------------------------------------------------------------------
MODE=gpu
SELECTED=""
BUDGET=""
while [ $# -gt 0 ]; do
    case $1 in
        --emulation) MODE=emulation ;;
        --stages) SELECTED=",${2:?--stages needs a list},"; shift ;;
        --stages=*) SELECTED=",${1#--stages=}," ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --budget=*) BUDGET=${1#--budget=} ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown option $1 (--emulation, --stages a,b,..., --budget S, --help)" >&2; exit 2 ;;
    esac
    shift
done
STAGES="machine build kernel-tests bundle selftest bench data-parallel"  # every stage, in run order (a new one goes here too)
for name in ${SELECTED//,/ }; do
    [[ " $STAGES " == *" $name "* ]] || { echo "run.sh: --stages: no stage '$name' (stages: $STAGES)" >&2; exit 2; }
done
if [ "$MODE" = gpu ]; then BUDGET=${BUDGET:-450}; else BUDGET=${BUDGET:-1500}; fi
case $BUDGET in ''|*[!0-9]*) echo "run.sh: --budget takes whole seconds, not '$BUDGET'" >&2; exit 2 ;; esac
STRICT=${STRICT:-0}
JOBS=${RELORA_JOBS:-$(nproc 2>/dev/null || echo 2)}
OUT=${OUT:-$ROOT/gpu-results}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/summary.txt" "$OUT/results.json" "$OUT/logs.tar.gz"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/relora-gpu.XXXXXX") || exit 1
LOGS=$WORK/logs
mkdir -p "$LOGS"

now() { local t=${EPOCHREALTIME:-$(date +%s)}; echo "${t/,/.}"; }
START=$(now)
DEADLINE=$(( ${START%.*} + BUDGET ))
RESERVE=10    # seconds kept for the last summary and archive
MIN_STAGE=5   # a stage that would get less than this is skipped
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---- recording ---------------------------------------------------------------------------------------------
# One entry per stage, in run order: its summary line and its JSON object.
S_NAMES=()
S_STATUS=()
S_LINES=()
S_JSON=()

json_string() {  # the argument as a JSON string; control characters dropped
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/ }
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/}
    printf '"%s"' "$(printf '%s' "$s" | LC_ALL=C tr -d '\000-\011\013-\037')"
}
json_value() {  # numbers and booleans as they are, the rest as strings
    if [[ $1 =~ ^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?$ || $1 == true || $1 == false || $1 == null ]]; then
        printf '%s' "$1"
    else
        json_string "$1"
    fi
}
json_or_null() { if [ -n "$1" ]; then json_string "$1"; else printf null; fi; }

# record NAME STATUS LINE JSON: adds the stage's result (or replaces its "running" entry) and rewrites $OUT.
record() {
    local i
    for i in "${!S_NAMES[@]}"; do
        if [ "${S_NAMES[$i]}" = "$1" ]; then
            S_STATUS[$i]=$2; S_LINES[$i]=$3; S_JSON[$i]=$4
            write_outputs
            return
        fi
    done
    S_NAMES+=("$1"); S_STATUS+=("$2"); S_LINES+=("$3"); S_JSON+=("$4")
    write_outputs
}

# A stage that did not run: skipped (it should have: counts as a failure) or n/a (not applicable here).
not_run() {  # not_run NAME skipped|n/a REASON
    local line="$1: $2: $3"
    echo "$line"
    record "$1" "$2" "$line" "{\"name\": $(json_string "$1"), \"status\": $(json_string "$2"), \"reason\": $(json_string "$3")}"
}
skip() { not_run "$1" skipped "$2"; }
not_applicable() { not_run "$1" n/a "$2"; }

write_outputs() {
    local i passed=0 failed=0 skipped=0 na=0 first=1
    {
        printf '{\n  "mode": "%s",\n  "started_utc": "%s",\n  "budget_seconds": %s,\n  "seconds": %s,\n' \
            "$MODE" "$STARTED_UTC" "$BUDGET" "$(elapsed "$START")"
        printf '  "strict": %s,\n  "extra_warnings": %s,\n  "stages": [\n' \
            "$([ "$STRICT" = 1 ] && echo true || echo false)" "$(json_string "${EXTRA_WARNINGS:-}")"
        for i in "${!S_NAMES[@]}"; do
            [ $first = 1 ] || printf ',\n'
            first=0
            printf '    %s' "${S_JSON[$i]}"
        done
        printf '\n  ]\n}\n'
    } > "$OUT/results.json.tmp" && mv "$OUT/results.json.tmp" "$OUT/results.json"
    for i in "${!S_NAMES[@]}"; do
        case ${S_STATUS[$i]} in
            pass) passed=$((passed + 1)) ;;
            n/a) na=$((na + 1)) ;;
            skipped) skipped=$((skipped + 1)) ;;
            running) ;;
            *) failed=$((failed + 1)) ;;
        esac
    done
    {
        echo "relora GPU script, $MODE mode, $STARTED_UTC, budget $BUDGET s"
        printf '%s\n' "${S_LINES[@]}"
        echo "total: $passed passed, $failed failed, $skipped skipped, $na not applicable in $(elapsed "$START") s"
    } > "$OUT/summary.txt.tmp" && mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
    tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" logs 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
    RUN_FAILED=$(( failed + skipped ))
}

# The line of a log that says what went wrong, in order of preference: a Swift fatal error (the CUDA
# backend's "cuda: <op> failed") or Kernels/Makefile's own sentence, the loader's missing symbol version, a
# failed check (FAIL), a compiler or make error, anything that says it failed; else the log's last line.
first_error() {
    local pattern line
    for pattern in 'Fatal error|cuda: .* failed|^Kernels: ' "version .GLIBC|error while loading shared libraries" '^FAIL' \
        'error:|error [0-9]|Error [0-9]|ERROR' 'failed|FAILED|not found|No such file|cannot|Segmentation|Abort|Killed|core dumped'; do
        line=$(sed '1,2d' "$1" 2>/dev/null | grep -m1 -E -- "$pattern")  # past run_logged's header
        [ -n "$line" ] && break
    done
    [ -n "$line" ] || line=$(sed '1,2d; $d' "$1" 2>/dev/null | grep -v '^[[:space:]]*$' | tail -1)  # not run_logged's lines
    printf '%s' "$line" | one_line 300
}
# stdin as one line of at most $1 bytes: control characters dropped, and bytes that are not UTF-8 (a
# log's binary noise, or a character cut in two) dropped too where iconv exists, else every non-ASCII byte.
one_line() {
    local text
    text=$(LC_ALL=C tr -d '\000-\037\177' | cut -b "1-$1")
    if command -v iconv >/dev/null; then printf '%s' "$text" | iconv -f UTF-8 -t UTF-8 -c 2>/dev/null
    else printf '%s' "$text" | LC_ALL=C tr -c '\040-\176' '?'; fi
}

# ---- running a stage -------------------------------------------------------------------------------------
CURRENT_PID=""
CURRENT_STAGE=""
# run_logged LOG LIMIT ENV... -- COMMAND...: runs COMMAND under `timeout` (in its own process group, so that
# make's children go too) with ENV (VAR=value words) added; sets R_EXIT and R_SECONDS.
run_logged() {
    local log=$1 limit=$2 t0
    shift 2
    local env=()
    while [ "$1" != "--" ]; do env+=("$1"); shift; done
    shift
    t0=$(now)
    { echo "\$ ${env[*]:+${env[*]} }$*"; echo "# limit ${limit} s, started $(date -u +%H:%M:%S) UTC"; } > "$log"
    timeout -k 10 "$limit" env "${env[@]}" "$@" >> "$log" 2>&1 &
    CURRENT_PID=$!
    wait "$CURRENT_PID"
    R_EXIT=$?
    CURRENT_PID=""
    R_SECONDS=$(elapsed "$t0")
    echo "# exit $R_EXIT after $R_SECONDS s" >> "$log"
}

# Whether --stages selected NAME (every stage without it). The bundle goes with any stage after it.
selected() {
    [ -z "$SELECTED" ] || [[ $SELECTED == *",$1,"* ]] && return 0
    [ "$1" = bundle ] && [[ -n ${SELECTED//,/} ]] && [ -n "$(echo "${SELECTED//,/ }" | tr ' ' '\n' | grep -vxE 'machine|build|kernel-tests|')" ]
}

# stage NAME LIMIT [--device] [--env VAR=value]... -- COMMAND...
#   Runs COMMAND with its output in logs/NAME.log, at most LIMIT seconds (less when the run's budget has less
#   left), and records its result. --device: a failure (not a timeout) reruns it once with
#   CUDA_LAUNCH_BLOCKING=1 into logs/NAME.rerun.log. --env: variables for this command only. Afterwards
#   `figures_NAME LOG` (NAME with - as _), when defined, prints the stage's key figures as key=value lines
#   (summary=TEXT goes on its summary line). Returns 0 when the stage passed.
stage() {
    local name=$1 limit=$2 device=0 env=()
    shift 2
    while [ "$1" != "--" ]; do
        case $1 in
            --device) device=1 ;;
            --env) env+=("$2"); shift ;;
            *) echo "run.sh: stage $name: unknown option $1" >&2; return 2 ;;
        esac
        shift
    done
    shift
    if ! selected "$name"; then not_applicable "$name" "not selected (--stages)"; return 1; fi
    local left=$(( DEADLINE - $(date +%s) - RESERVE ))
    if [ "$left" -lt "$MIN_STAGE" ]; then skip "$name" "out of time: ${left} s of the run's ${BUDGET} s budget left"; return 1; fi
    [ "$limit" -gt "$left" ] && limit=$left
    local log=$LOGS/$name.log
    CURRENT_STAGE=$name
    record "$name" running "$name: running (limit $limit s)" \
        "{\"name\": $(json_string "$name"), \"status\": \"running\", \"limit_seconds\": $limit, \"log\": \"logs/$name.log\"}"
    run_logged "$log" "$limit" "${env[@]}" -- "$@"
    local exit=$R_EXIT seconds=$R_SECONDS status=pass
    case $exit in 0) ;; 124|137) status=timeout ;; *) status=fail ;; esac
    local error="" rerun_json=null rerun_text=""
    if [ $status = timeout ]; then
        error="timed out after $limit s; last line: $(sed '1,2d; $d' "$log" | grep -v '^[[:space:]]*$' | tail -1 | one_line 250)"
    elif [ $status = fail ]; then
        error=$(first_error "$log")
    fi
    if [ $status = fail ] && [ $device = 1 ]; then
        left=$(( DEADLINE - $(date +%s) - RESERVE ))
        if [ "$left" -ge "$MIN_STAGE" ]; then
            local rlimit=$limit
            [ "$rlimit" -gt "$left" ] && rlimit=$left
            run_logged "$LOGS/$name.rerun.log" "$rlimit" "${env[@]}" CUDA_LAUNCH_BLOCKING=1 -- "$@"
            local rerror=""
            if [ "$R_EXIT" = 0 ]; then
                rerun_text="; passed when rerun with CUDA_LAUNCH_BLOCKING=1 ($R_SECONDS s)"
            else
                case $R_EXIT in 124|137) rerror="timed out after $rlimit s" ;; *) rerror=$(first_error "$LOGS/$name.rerun.log") ;; esac
                rerun_text="; rerun with CUDA_LAUNCH_BLOCKING=1: exit $R_EXIT in $R_SECONDS s"
                [ -n "$rerror" ] && error=$rerror
            fi
            rerun_json="{\"exit\": $R_EXIT, \"seconds\": $R_SECONDS, \"limit_seconds\": $rlimit, \"log\": \"logs/$name.rerun.log\", \"first_error\": $(json_or_null "$rerror")}"
        else
            rerun_text="; no time left to rerun with CUDA_LAUNCH_BLOCKING=1"
        fi
    fi
    # Key figures, from the stage's own function.
    local figures="" summary="" kv key value fn="figures_${name//-/_}"
    if declare -F "$fn" >/dev/null; then
        while IFS= read -r kv; do
            [[ $kv == *=* ]] || continue
            key=${kv%%=*}; value=${kv#*=}
            if [ "$key" = summary ]; then summary=$value; continue; fi
            figures+="${figures:+, }$(json_string "$key"): $(json_value "$value")"
        done < <("$fn" "$log" 2>/dev/null)
    fi
    local line
    case $status in
        pass) line="$name: pass in $seconds s${summary:+ ($summary)}" ;;
        timeout) line="$name: TIMEOUT ($error)${summary:+ ($summary)}" ;;
        fail) line="$name: FAIL (exit $exit in $seconds s$rerun_text)${summary:+ ($summary)}: \"$error\"" ;;
    esac
    echo "$line"
    record "$name" "$status" "$line" "{\"name\": $(json_string "$name"), \"status\": \"$status\", \"seconds\": $seconds, \"exit\": $exit, \"limit_seconds\": $limit, \"log\": \"logs/$name.log\", \"first_error\": $(json_or_null "$error"), \"rerun\": $rerun_json, \"figures\": {$figures}}"
    CURRENT_STAGE=""
    [ $status = pass ]
}

on_signal() {
    [ -n "$CURRENT_PID" ] && kill -TERM "$CURRENT_PID" 2>/dev/null
    if [ -n "$CURRENT_STAGE" ]; then
        local line="$CURRENT_STAGE: INTERRUPTED (the script was stopped from outside after $(elapsed "$START") s)"
        echo "$line"
        record "$CURRENT_STAGE" interrupted "$line" \
            "{\"name\": $(json_string "$CURRENT_STAGE"), \"status\": \"interrupted\", \"log\": \"logs/$CURRENT_STAGE.log\"}"
    fi
    exit 1
}
trap on_signal TERM INT HUP
trap 'write_outputs; rm -rf "$WORK"' EXIT

STARTED_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
RUN_FAILED=0
write_outputs
echo "relora GPU script: $MODE mode, budget $BUDGET s, results in $OUT"

# ---- the machine -------------------------------------------------------------------------------------------
if [ "$MODE" = gpu ] && [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    elif [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
    else  # the CUDA 13 wheels (nvidia-cuda-nvcc & co.) in python3's site-packages, as Kernels/ci.sh installs them
        CUDA_HOME=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null)
        [ -x "$CUDA_HOME/bin/nvcc" ] || CUDA_HOME=/usr/local/cuda
    fi
fi
export CUDA_HOME=${CUDA_HOME:-}

# The C++ runtime a process would load by default: the loader's cache, else the usual folders.
system_libstdcxx() {
    local p
    p=$({ ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | awk '/libstdc\+\+\.so\.6 .*x86-64/ { print $NF; exit }')
    [ -z "$p" ] && p=$(ls /lib/x86_64-linux-gnu/libstdc++.so.6 /usr/lib/x86_64-linux-gnu/libstdc++.so.6 /usr/lib64/libstdc++.so.6 \
        /lib64/libstdc++.so.6 2>/dev/null | head -1)
    echo "$p"
}
glibcxx_level() {  # the newest GLIBCXX_3.4.N a libstdc++ defines, as N (0 when unknown)
    local n
    n=$(grep -ao 'GLIBCXX_3\.4\.[0-9]*' "$1" 2>/dev/null | sed 's/.*\.//' | sort -n | tail -1)
    echo "${n:-0}"
}

machine_info() {
    echo "date: $(date -u)"
    echo "kernel: $(uname -srm)"
    echo "os: $( (. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME") || echo unknown)"
    echo "cpus: $(nproc)"
    echo "gpus:"
    nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_cap,clocks.max.sm --format=csv 2>&1 | sed 's/^/  /'
    echo "CUDA_HOME: ${CUDA_HOME:-unset}"
    [ -n "$CUDA_HOME" ] && "$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -2 | sed 's/^/  /'
    local cxx
    cxx=$(command -v g++-12 || command -v g++)
    echo "host compiler: ${cxx:-none} $("${cxx:-false}" --version 2>/dev/null | head -1)"
    local lib
    lib=$(system_libstdcxx)
    echo "libstdc++ (machine): ${lib:-not found}, GLIBCXX_3.4.$(glibcxx_level "$lib")"
    echo "python3: $(python3 --version 2>&1) ($(command -v python3))"
    echo "STRICT=$STRICT EXTRA_WARNINGS=${EXTRA_WARNINGS:-}"
}
export -f machine_info system_libstdcxx glibcxx_level
export STRICT
figures_machine() {
    local log=$LOGS/machine.txt
    cp "$1" "$log"
    local gpu driver cap
    gpu=$(awk -F', ' '/^  0, / { print $2 }' "$log")
    driver=$(awk -F', ' '/^  0, / { print $4 }' "$log")
    cap=$(awk -F', ' '/^  0, / { print $5 }' "$log")
    local nvcc cxx
    nvcc=$(grep -o 'release [0-9.]*' "$log" | head -1 | cut -d' ' -f2)
    cxx=$(sed -n 's/^host compiler: [^ ]* \(.*\)/\1/p' "$log")
    echo "gpu=${gpu:-none}"
    echo "gpus=$GPUS"
    [ -n "$driver" ] && echo "driver=$driver"
    [ -n "$cap" ] && echo "compute_capability=$cap"
    [ -n "$nvcc" ] && echo "nvcc=$nvcc"
    echo "host_compiler=$cxx"
    echo "libstdcxx_glibcxx=3.4.$(glibcxx_level "$(system_libstdcxx)")"
    if [ "$MODE" = gpu ]; then
        echo "summary=${gpu:-no GPU}$([ "$GPUS" -gt 1 ] && echo " x $GPUS")${driver:+, driver $driver}, nvcc ${nvcc:-not found}, $cxx"
    else
        echo "summary=the CPU emulation, $(nproc) CPUs, $cxx"
    fi
}
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
stage machine 30 -- bash -c machine_info

# ---- the kernels: no Swift, no bundle --------------------------------------------------------------------
KMAKE=(make -C Kernels --no-print-directory STRICT="$STRICT")
if [ "$MODE" = gpu ]; then
    LIBRARY=$ROOT/Kernels/build/libreloracuda.so
    # The machine's nvcc may be older or newer than the pinned 13.0: build for its own GPU's arch only
    # (every arch when no GPU answers).
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
    KMAKE+=(CUDA_HOME="$CUDA_HOME")
    # nccl.h, for collectives.cu's types and prototypes (NCCL itself is opened at run time): NCCL_INCLUDE or
    # NCCL_HOME when set (make reads them), else the first of the toolkit's include/, the system's, the
    # nvidia-nccl wheel beside the CUDA wheels, and python3's nvidia-nccl wheel (PyTorch's dependency).
    if [ -z "${NCCL_INCLUDE:-}" ] && [ -z "${NCCL_HOME:-}" ]; then
        for d in "$CUDA_HOME/include" /usr/include /usr/local/include "$CUDA_HOME/../nccl/include" \
            "$(python3 -c 'import importlib.util as u, os; s = u.find_spec("nvidia.nccl"); print(os.path.join(list(s.submodule_search_locations)[0], "include"))' 2>/dev/null)"; do
            if [ -n "$d" ] && [ -f "$d/nccl.h" ]; then KMAKE+=(NCCL_INCLUDE="$d"); break; fi
        done
    fi
    [ -n "$arch" ] && KMAKE+=(CUDA_ARCHS="$arch" GENCODE="-gencode arch=compute_$arch,code=sm_$arch" ARCH_TEXT="sm_$arch")
    BUILD_TARGETS=(cuda test-programs-cuda)
    TEST_TARGETS=(test-cuda)
else
    LIBRARY=$ROOT/Kernels/build/libreloracuda-emu.so
    BUILD_TARGETS=(emu test-programs)
    TEST_TARGETS=(test)
fi
figures_build() {
    local warnings spills
    warnings=$(grep -c -E 'warning[: #]' "$1")
    echo "warnings=$warnings"
    if [ -f Kernels/build/ptxas_report.txt ] && [ "$MODE" = gpu ] && [ "$R_EXIT" = 0 ]; then  # not a stale one
        cp Kernels/build/ptxas_report.txt "$LOGS/"
        spills=$(sed -n 's/.*architectures; \([0-9]*\) with spills.*/\1/p' Kernels/build/ptxas_report.txt | tail -1)
        echo "kernels_with_spills=${spills:-unknown}"
    fi
    local first
    first=$(grep -m1 -E 'warning[: #]' "$1" | one_line 200)
    local text="$warnings warnings"
    case ${spills:-} in '') ;; 0) text+=", no spills" ;; *) text+=", $spills kernel/architecture pairs spill" ;; esac
    [ -n "$first" ] && echo "first_warning=$first"
    [ "$warnings" != 0 ] && [ "$STRICT" != 1 ] && text+=", reported, not fatal: \"$first\""
    echo "summary=$text"
}
stage build $([ "$MODE" = gpu ] && echo 180 || echo 600) -- "${KMAKE[@]}" -j"$JOBS" "${BUILD_TARGETS[@]}"
# What the later stages need of the build: it passed, or it was not selected and a library is there (a
# library left by an earlier build is stale after a failed one, and `make test` would only fail again).
status_of() { local i; for i in "${!S_NAMES[@]}"; do [ "${S_NAMES[$i]}" = "$1" ] && echo "${S_STATUS[$i]}"; done; }
case $(status_of build) in
    pass) LIBRARY_PROBLEM="" ;;
    n/a) [ -f "$LIBRARY" ] && LIBRARY_PROBLEM="" || LIBRARY_PROBLEM="no kernel library ($LIBRARY) and the build was not selected" ;;
    *) LIBRARY_PROBLEM="the kernel build did not pass ($(status_of build))" ;;
esac
figures_kernel_tests() {
    local pass fail
    pass=$(grep -c '^PASS' "$1"); fail=$(grep -c '^FAIL' "$1")
    echo "passed=$pass"; echo "failed=$fail"
    echo "summary=$pass checks passed, $fail failed"
}
if [ -z "$LIBRARY_PROBLEM" ]; then
    stage kernel-tests $([ "$MODE" = gpu ] && echo 90 || echo 300) --device -- "${KMAKE[@]}" "${TEST_TARGETS[@]}"
else
    skip kernel-tests "$LIBRARY_PROBLEM"
fi

# ---- the bundle: the Swift binaries and what they load ----------------------------------------------------
if [ "$MODE" = gpu ]; then DIST=${DIST:-$ROOT/dist/gpu}; else DIST=${DIST:-$ROOT/.build/debug}; fi
BUNDLE_PROBLEM=""
SWIFT_LIBS=""
# The folder the Swift stages' LD_LIBRARY_PATH names: links to the bundle's libraries. The bundle's C++
# runtime (libstdc++.so.6 and libgcc_s.so.1, from the machine package.sh ran on) goes in only when it is newer
# than the machine's: the binaries need at least the runtime they were linked against, and libreloracuda.so,
# built here by the machine's g++, needs at least the machine's; libstdc++ is backward compatible, so the
# newer of the two serves both. With the bundle's always first, a machine with a newer g++ than the packaging
# one fails to load its own kernel library inside relora ("GLIBCXX_3.4.32 not found"); with the machine's
# always first, an older machine fails to start relora. (Linking libstdc++ statically into the binaries was
# the other way out: swift build links it with an explicit -lstdc++ from the static stdlib's link file, which
# -static-libstdc++ does not reach, and two C++ runtimes in one process are harder to reason about.)
swift_libraries() {
    local dir=$WORK/swift-lib f base cxx=() mine theirs
    mkdir -p "$dir"
    for f in "$DIST"/lib/*.so* "$DIST"/lib/cxx/*.so*; do
        [ -e "$f" ] || continue
        base=$(basename "$f")
        case $base in
            libstdc++.so*|libgcc_s.so*) cxx+=("$f") ;;
            *) ln -sf "$f" "$dir/$base" ;;
        esac
    done
    SWIFT_LIBS=$dir
    [ ${#cxx[@]} -gt 0 ] || { CXX_NOTE="C++ runtime: the machine's (the bundle has none)"; return; }
    mine=$(glibcxx_level "$(system_libstdcxx)")
    theirs=0
    for f in "${cxx[@]}"; do case $(basename "$f") in libstdc++*) theirs=$(glibcxx_level "$f") ;; esac; done
    if [ "$theirs" -gt "$mine" ]; then
        for f in "${cxx[@]}"; do ln -sf "$f" "$dir/$(basename "$f")"; done
        CXX_NOTE="C++ runtime: the bundle's (GLIBCXX_3.4.$theirs, newer than the machine's 3.4.$mine)"
    else
        CXX_NOTE="C++ runtime: the machine's (GLIBCXX_3.4.$mine; the bundle's is 3.4.$theirs)"
    fi
}
bundle_check() {  # unpacked already; prints what the Swift stages will run with, and relora starts
    echo "bundle: $DIST"
    ls -la "$DIST" | sed 's/^/  /'
    [ -f "$DIST/BUNDLE.txt" ] && sed 's/^/  /' "$DIST/BUNDLE.txt"
    echo "LD_LIBRARY_PATH for the Swift stages: $SWIFT_LIBS"
    ls -la "$SWIFT_LIBS" | sed 's/^/  /'
    LD_LIBRARY_PATH=$SWIFT_LIBS ldd "$DIST/relora" 2>&1 | sed 's/^/  /'
    LD_LIBRARY_PATH=$SWIFT_LIBS "$DIST/relora" info && LD_LIBRARY_PATH=$SWIFT_LIBS "$DIST/relora-bench" --help > /dev/null
}
export -f bundle_check
if [ "$MODE" = gpu ] && [ "$DIST" = "$ROOT/dist/gpu" ] && [ ! -x "$DIST/relora" ] && [ -f dist/gpu.tar.xz ]; then
    # What package.sh made, carried compressed.
    tar -C dist -xJf dist/gpu.tar.xz 2>/dev/null ||
        python3 -c 'import tarfile; tarfile.open("dist/gpu.tar.xz").extractall("dist")' 2>/dev/null
fi
if ! selected bundle; then
    not_applicable bundle "not selected (--stages)"
elif [ ! -x "$DIST/relora" ] || [ ! -x "$DIST/relora-bench" ]; then
    if [ "$MODE" = gpu ]; then
        BUNDLE_PROBLEM="no bundle: no $DIST/relora and no dist/gpu.tar.xz (run Benchmarks/gpu/package.sh where Swift is and carry dist/gpu.tar.xz)"
    else
        BUNDLE_PROBLEM="no $DIST/relora or relora-bench (swift build first, or set DIST)"
    fi
    skip bundle "$BUNDLE_PROBLEM"
else
    swift_libraries
    export SWIFT_LIBS DIST
    figures_bundle() { echo "summary=$CXX_NOTE"; echo "cxx_runtime=$CXX_NOTE"; }
    if ! stage bundle 60 -- bash -c bundle_check; then
        if [ -f "$LOGS/bundle.log" ]; then BUNDLE_PROBLEM="the bundle does not start: $(first_error "$LOGS/bundle.log")"
        else BUNDLE_PROBLEM="the bundle was not checked (out of time)"; fi
    fi
fi

# swift_stage NAME LIMIT [stage options] -- COMMAND...: a stage that runs the bundle's binaries on the kernel
# library; skipped with the reason when there is no usable bundle or library. (The data-parallel stage goes
# through here too.)
swift_stage() {
    local name=$1
    if ! selected "$name"; then not_applicable "$name" "not selected (--stages)"; return 1; fi
    if [ -n "$BUNDLE_PROBLEM" ]; then skip "$name" "$BUNDLE_PROBLEM"; return 1; fi
    if [ "$RELORA_CUDA_LIB" = "$LIBRARY" ] && [ -n "$LIBRARY_PROBLEM" ]; then skip "$name" "$LIBRARY_PROBLEM"; return 1; fi
    if [ ! -f "$RELORA_CUDA_LIB" ]; then skip "$name" "no kernel library at $RELORA_CUDA_LIB"; return 1; fi
    local limit=$2
    shift 2
    local opts=()
    while [ "$1" != "--" ]; do opts+=("$1"); shift; done
    stage "$name" "$limit" "${opts[@]}" --env LD_LIBRARY_PATH="$SWIFT_LIBS" --env RELORA_CUDA_LIB="$RELORA_CUDA_LIB" "$@"
}
RELORA_CUDA_LIB=${RELORA_CUDA_LIB:-$LIBRARY}

# ---- the Swift stages --------------------------------------------------------------------------------------
# Every check as JSON (max error and bound each) in selftest.json; failures on stderr as they happen.
figures_selftest() {
    local passed failed
    passed=$(grep -o '"passed" *: *[0-9]*' "$LOGS/selftest.json" 2>/dev/null | grep -o '[0-9]*$')
    failed=$(grep -o '"failed" *: *[0-9]*' "$LOGS/selftest.json" 2>/dev/null | grep -o '[0-9]*$')
    [ -n "$passed" ] || return 0
    echo "passed=$passed"; echo "failed=$failed"
    echo "summary=$passed checks passed, $failed failed"
}
swift_stage selftest $([ "$MODE" = gpu ] && echo 150 || echo 600) --device -- \
    sh -c 'exec "$0" selftest --device cuda --json > "$1"' "$DIST/relora" "$LOGS/selftest.json"

figures_bench() {
    [ -f "$LOGS/bench.json" ] && command -v python3 >/dev/null || return 0
    python3 - "$LOGS/bench.json" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
def num(x):
    return "null" if x is None else f"{x:.4g}"
rows = b.get("quantized_linear", [])
if rows:
    print("plain_fwd_tflops_max=" + num(max(r["plain_fwd_tflops"] for r in rows)))
    print("q4_0_fwd_ratio_min=" + num(min(r.get("q4_0_fwd_ratio", 0) for r in rows)))
padded = b.get("padded_rows", [])
if padded:  # the model's padded rows against packed ones, per product (time packed / time padded)
    print("padded_rows_speedup=" + ", ".join(f"{r['shape']} {r['speedup']:.2f}x" for r in padded))
for r in b.get("bandwidth", []):
    print(f"dequantize_{r['format']}_gbs=" + num(r["dequantize_gbs"]))
steps = []
for r in b.get("training_steps", []):
    key = r["variant"].replace(" ", "_")
    print(f"steps_{key}_tokens_per_s=" + num(r["tokens_per_second"]))
    print(f"steps_{key}_mfu=" + num(r.get("mfu")))
    steps.append(f"{r['variant']} {r['tokens_per_second']:.0f} tok/s" + (f" MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""))
    p = r.get("profile")
    if p and p.get("step_seconds"):  # the per-op profile: the three largest categories and "other", share of the step
        cats = sorted(p["categories"].items(), key=lambda c: -c[1]["seconds"])[:3]
        def share(c):
            pred = c[1].get("predicted_seconds")
            return f"{c[0]} {100 * c[1]['seconds'] / p['step_seconds']:.0f}%" + (f" ({c[1]['seconds'] / pred:.1f}x pred)" if pred else "")
        print(f"profile_{key}=" + ", ".join(share(c) for c in cats) + f", other {100 * p['other_seconds'] / p['step_seconds']:.0f}%")
print("summary=" + "; ".join(steps[:2]) + ("" if b.get("emulated") is False else "; emulated: numbers mean nothing"))
PY
}
swift_stage bench $([ "$MODE" = gpu ] && echo 180 || echo 600) --device -- "$DIST/relora-bench" gpu --json "$LOGS/bench.json"

# Further stages go here, through swift_stage (or not_applicable with the reason when the machine cannot
# run them), their files in $LOGS, their key figures from a figures_NAME function. A stage's log starts with
# two lines (the command, its limit) and ends with one ("# exit N after S s"): a figure taken from the
# program's last line skips that one (as figures_data_parallel does).

# Data parallel: the 1b LoRA r128 q4_0 steps on 1 GPU and as 2 torchrun-style ranks over NCCL (tokens/s per
# GPU, scaling efficiency, the communication share). Needs 2 GPUs: NCCL (2.5 and later) refuses a
# communicator with two ranks on one device ("Duplicate GPU detected", ncclInvalidUsage) and no NCCL
# variable lifts that check, so a 1-GPU machine has no 2-rank run to try.
data_parallel() {  # data_parallel DIST OUT
    local dist=$1 dir=$2/data_parallel port=$(( 29500 + RANDOM % 500 ))
    mkdir -p "$dir"
    # Random token ids below the 1b vocabulary (32100) as a uint16 .npy; only the speed matters here.
    python3 - "$dir/train.npy" <<'PY' || return 1
import array, random, struct, sys
n, vocab = 1 << 19, 32100
header = "{'descr': '<u2', 'fortran_order': False, 'shape': (%d,), }" % n
header += " " * (63 - (10 + len(header)) % 64) + "\n"  # the data starts on a 64-byte boundary
rng = random.Random(0)
tokens = array.array("H", (rng.randrange(vocab) for _ in range(n)))
if sys.byteorder == "big": tokens.byteswap()
with open(sys.argv[1], "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + tokens.tobytes())
PY
    local set=(--device cuda --set mode=lora --set relora_every=null --set quant=q4_0 --set lora_r=128
               --set micro_batch=4 --set grad_accum=2 --set steps=8 --set warmup_steps=0 --set eval_every=1000000
               --set checkpoint_every=1000000 --set train_data="$dir/train.npy")
    "$dist/relora" train Configs/recipes/plan_1024.json "${set[@]}" --set run_dir="$dir/w1" > "$dir/w1.log" 2>&1 \
        || { echo "1 GPU run failed: $(tail -1 "$dir/w1.log")"; return 1; }
    local pids=() r rc=0
    for r in 0 1; do
        WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 NCCL_COMM_ID=127.0.0.1:$port RELORA_COLLECTIVE_TIMEOUT=60 \
            "$dist/relora" train Configs/recipes/plan_1024.json "${set[@]}" --set run_dir="$dir/w2" > "$dir/w2-rank$r.log" 2>&1 &
        pids+=($!)
    done
    for r in 0 1; do wait "${pids[$r]}" || { rc=$?; echo "2 GPU run: rank $r exited $rc: $(tail -1 "$dir/w2-rank$r.log")"; }; done
    [ "$rc" = 0 ] || return "$rc"
    python3 - "$dir" <<'PY'
import json, statistics, sys
d = sys.argv[1]
def steps(run):
    return [x for x in map(json.loads, open(f"{d}/{run}/metrics.jsonl")) if "ms" in x]
w1, w2 = steps("w1"), steps("w2")
tok1 = statistics.median(x["tokens_per_second"] for x in w1[2:])
tok2 = statistics.median(x["tokens_per_second"] for x in w2[2:])
comm = statistics.median(x.get("comm_ms", 0) / x["ms"] for x in w2[2:])
loss = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(w1, w2))
print(f"1 GPU: {tok1:.0f} tokens/s; 2 GPUs: {tok2:.0f} tokens/s = {tok2 / 2:.0f} per GPU, scaling efficiency "
      f"{tok2 / (2 * tok1):.3f}, comm share {100 * comm:.1f}%; step losses 2 vs 1 GPU: max relative difference {loss:.1e}")
PY
}
export -f data_parallel
figures_data_parallel() { echo "summary=$(sed '$d' "$1" | tail -1)"; }
if [ "$GPUS" -ge 2 ]; then
    swift_stage data-parallel 150 --device -- bash -c 'data_parallel "$0" "$1"' "$DIST" "$LOGS"
else
    not_applicable data-parallel "needs 2 GPUs, this machine has $GPUS (NCCL refuses two ranks on one GPU)"
fi

[ "$RUN_FAILED" = 0 ]
