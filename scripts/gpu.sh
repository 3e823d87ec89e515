#!/usr/bin/env bash
# Builds the GPU executables here (nvcc, no GPU needed), packs them with their shared libraries,
# and runs the GPU suites on a host that has an H100/H200 and the NVIDIA driver but none of our
# build dependencies.
#
#   scripts/gpu.sh build                 configure + build the GPU targets, CUDA on, Release,
#                                        into $ANCHOR_BUILD_DIR (default build-gpu/)
#   scripts/gpu.sh bundle [DIR]          pack them into DIR (default .gpu/bundle/)
#   scripts/gpu.sh run SUITE [ARGS...]   on the GPU host: run SUITE with the bundle
#
# Suites (logs and results under ${OUT:-./gpu-out}/SUITE/, one summary line per step; the exit
# status is non-zero when any step failed):
#   tests    the GPU test executables (gtest; GTEST_FILTER=... selects tests)
#   bench    the cuDNN baseline (bench/gpu/sdpa_baseline.py, needs python3 + torch) and then
#            anchor_kernel_bench on the same lengths; ARGS go to anchor_kernel_bench, e.g.
#            --lengths=32768,131072 --reps=3 (the baseline follows --lengths)
#   service  anchorserve on the CUDA backend on loopback, anchorctl health/info, attend --verify
#            at three sizes, a short load, the Prefill client's download from a synthetic server
#            (anchor_prefill_wire_bench, default and 64 MiB malloc trim threshold), then SIGTERM
#            and a clean exit
#   all      tests, service, bench (ARGS go to bench)
#   profile  Nsight Compute (ncu) over the identification kernels at N = 32k (not in all)
#   mass     mass targets vs fixed theta (bench/RESULTS.md section 10a): the cuDNN baseline, then
#            anchor_mass_bench --backend=cuda one length at a time (not in all); ARGS go to
#            anchor_mass_bench, e.g. --n=32768,65536,131072 --seeds=0,1 (the baseline follows --n)
#
# On the GPU host, from the repository root: scripts/gpu.sh run all
# (or from anywhere: BUNDLE/scripts/gpu.sh run all, the bundle carries this script).
# Environment: ANCHOR_BUILD_DIR (build, bundle), ANCHOR_BUILD_JOBS (build); ANCHOR_BUNDLE (run: the
# bundle, default .gpu/bundle/ or the bundle this script lies in); OUT; CUDA_LIB_DIR (the host's
# CUDA libraries, default /usr/local/cuda/lib64); ANCHOR_SERVICE_BACKEND (service: default cuda;
# cpu for a dry run of the suite on a machine without a GPU).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  sed -n '2,31s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}
die() {
  echo "gpu.sh: $*" >&2
  exit 2
}

# What the GPU host runs. The bundle takes those that exist.
gpu_tests=(anchor_cuda_plan_tests anchor_attention_kernel_test anchor_gpu_tests anchor_layer_ops_tests
  anchor_cuda_prefill_tests anchor_device_fault_test)
gpu_benches=(anchor_kernel_bench anchor_attention_microbench anchor_prefill_bench anchor_mass_bench
  anchor_prefill_wire_bench anchor_layer_ops_bench)
bundle_exes=(anchorserve anchorctl "${gpu_tests[@]}" "${gpu_benches[@]}")
# Lengths of anchor_kernel_bench when --lengths is not given (its own default list).
bench_lengths=(4096 8192 16384 32768 65536 131072)
bundle_limit_mib=60  # a lent GPU machine takes at most 64 MiB of carried files per call

# ---------------------------------------------------------------------------------------------
# build

cmd_build() {
  [ $# -eq 0 ] || die "build takes no arguments"
  if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    die "nvcc not found (PATH, CUDACXX or /usr/local/cuda/bin/nvcc); the GPU build needs it"
  fi
  local build_dir=${ANCHOR_BUILD_DIR:-$root/build-gpu}
  echo "gpu.sh: building ${bundle_exes[*]} into $build_dir (CUDA on, Release)"
  ANCHOR_BUILD_DIR=$build_dir ANCHOR_ENABLE_CUDA=ON "$root/scripts/build.sh" "${bundle_exes[@]}"
}

# ---------------------------------------------------------------------------------------------
# bundle

# Shared libraries the GPU host provides itself: the C runtime and the NVIDIA driver / CUDA
# libraries (libcuda from the driver; cuBLAS and cuBLASLt from /usr/local/cuda/lib64).
host_lib_pattern='/(libc|libm|libdl|librt|libpthread|libcuda|libcublas|libcublasLt|libnvidia-[a-z0-9_-]*)\.so|/ld-linux'

cmd_bundle() {
  [ $# -le 1 ] || die "usage: gpu.sh bundle [DIR]"
  local out=${1:-$root/.gpu/bundle}
  local build_dir=${ANCHOR_BUILD_DIR:-$root/build-gpu}
  [ -d "$build_dir/bin" ] || die "no executables in $build_dir/bin; run scripts/gpu.sh build first (or set ANCHOR_BUILD_DIR)"
  build_dir=$(cd "$build_dir" && pwd)
  if [ -e "$out" ]; then
    # Only ever replace a bundle of ours (or an empty folder).
    if [ -f "$out/MANIFEST" ] && head -1 "$out/MANIFEST" | grep -q '^anchorserve GPU bundle'; then
      rm -rf "$out"
    elif [ -d "$out" ] && [ -z "$(ls -A "$out")" ]; then
      rmdir "$out"
    else
      die "$out exists and is not a bundle made by gpu.sh; choose another DIR"
    fi
  fi

  local present=() missing=() exe
  for exe in "${bundle_exes[@]}"; do
    if [ -x "$build_dir/bin/$exe" ]; then present+=("$exe"); else missing+=("$exe"); fi
  done
  [ ${#present[@]} -gt 0 ] || die "none of ${bundle_exes[*]} is in $build_dir/bin"

  mkdir -p "$out/bin" "$out/lib" "$out/scripts" "$out/bench/gpu"
  local libs=()
  for exe in "${present[@]}"; do
    cp -f "$build_dir/bin/$exe" "$out/bin/"
    strip "$out/bin/$exe"  # symbols only; the CUDA fat binary stays
    local ldd_out
    ldd_out=$(ldd "$build_dir/bin/$exe") || die "ldd failed on $build_dir/bin/$exe"
    if grep -q 'not found' <<<"$ldd_out"; then
      die "$exe needs libraries this machine cannot find: $(grep 'not found' <<<"$ldd_out" | tr -s ' \t' ' ')"
    fi
    while IFS= read -r lib; do libs+=("$lib"); done < <(
      awk '/=>/ && $3 ~ /^\// {print $3}' <<<"$ldd_out" | grep -v -E "$host_lib_pattern" || true)
  done
  if [ ${#libs[@]} -gt 0 ]; then
    local lib
    while IFS= read -r lib; do cp -fL "$lib" "$out/lib/"; done < <(printf '%s\n' "${libs[@]}" | sort -u)
  fi

  cat > "$out/run" <<'RUN'
#!/usr/bin/env bash
# Runs an executable of this bundle with the bundle's shared libraries, then the host's CUDA
# libraries (CUDA_LIB_DIR, default /usr/local/cuda/lib64); the driver's libcuda comes from the
# system path.   usage: run EXE [ARGS...]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ $# -lt 1 ]; then
  echo "usage: $0 EXE [ARGS...]; executables: $(ls "$here/bin" | tr '\n' ' ')" >&2
  exit 2
fi
exe=$1
shift
if [ ! -x "$here/bin/$exe" ]; then
  echo "run: $exe is not in this bundle (it has: $(ls "$here/bin" | tr '\n' ' '))" >&2
  exit 127
fi
export LD_LIBRARY_PATH="$here/lib:${CUDA_LIB_DIR:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$here/bin/$exe" "$@"
RUN
  chmod +x "$out/run"
  # The suites (this script) and the python baseline travel with the executables.
  cp -f "$root/scripts/gpu.sh" "$out/scripts/gpu.sh"
  cp -f "$root/scripts/make_tiny_model.py" "$out/scripts/"
  cp -f "$root/bench/gpu/sdpa_baseline.py" "$out/bench/gpu/"

  local cuda arch commit
  cuda=$(sed -n 's/^ANCHOR_ENABLE_CUDA:BOOL=//p' "$build_dir/CMakeCache.txt" 2>/dev/null || true)
  arch=$(sed -n 's/^ANCHOR_CUDA_ARCHITECTURES:STRING=//p' "$build_dir/CMakeCache.txt" 2>/dev/null || true)
  commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    commit="$commit (with uncommitted changes)"
  fi
  {
    echo "anchorserve GPU bundle"
    echo "made:        $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n)"
    echo "commit:      $commit"
    if [ "$cuda" = ON ]; then
      echo "build dir:   $build_dir (CUDA on, architectures ${arch:-?})"
    else
      echo "build dir:   $build_dir (CUDA ${cuda:-unknown}: no CUDA backend in anchorserve)"
    fi
    echo "executables: ${present[*]}"
    echo "missing:     ${missing[*]:-none}"
    echo "libraries:   $(find "$out/lib" -maxdepth 1 -type f | wc -l) in lib/"
  } > "$out/MANIFEST"

  if [ "${cuda:-}" != ON ]; then
    echo "gpu.sh: warning: $build_dir is a CPU-only build (ANCHOR_ENABLE_CUDA=${cuda:-unknown}); its anchorserve has no CUDA backend" >&2
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu.sh: warning: not in $build_dir/bin, so not bundled: ${missing[*]}" >&2
  fi
  local bytes mib
  bytes=$(du -sb "$out" | cut -f1)
  mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
  echo "gpu.sh: bundle $out: $mib MiB (${#present[@]} executables, $(find "$out/lib" -maxdepth 1 -type f | wc -l) libraries)"
  if [ "$bytes" -gt $((bundle_limit_mib * 1048576)) ]; then
    echo "gpu.sh: warning: the bundle is over $bundle_limit_mib MiB; a lent GPU machine takes at most 64 MiB of carried files per call" >&2
  fi
}

# ---------------------------------------------------------------------------------------------
# run

# Per-suite bookkeeping: one line per step in $suite_dir/summary.txt.
bundle=""
out_root=""
suite_dir=""
suite_failed=0

# step NAME TIMEOUT_S LOG CMD...: runs CMD with a time limit, output to LOG (relative to the
# suite folder), and prints one line: PASS/FAIL, the step, seconds, the log.
step() {
  local name=$1 limit=$2 log=$suite_dir/$3
  shift 3
  local start rc=0 secs status detail=""
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1 || rc=$?
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 0 ]; then status=PASS; else status=FAIL; suite_failed=1; fi
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then detail=" (timed out after ${limit}s)"
  elif [ "$rc" -eq 127 ]; then detail=" (exit 127: $1 not found)"
  elif [ "$rc" -ne 0 ]; then detail=" (exit $rc)"; fi
  # gtest's totals, when the log has them.
  local counts
  counts=$(sed -n -E 's/^\[  (PASSED|FAILED|SKIPPED) +\] ([0-9]+) tests?.*/\2 \1/p' "$log" | tr '\n' ' ' |
    sed 's/ $//' | tr '[:upper:]' '[:lower:]')
  [ -n "$counts" ] && detail="$detail [$counts]"
  printf '%-4s %-28s %7ss  %s%s\n' "$status" "$name" "$secs" "${log#"$out_root"/}" "$detail" |
    tee -a "$suite_dir/summary.txt"
  return 0
}

# A step that is not run because something it needs is missing counts as failed.
step_missing() {
  local name=$1 why=$2
  suite_failed=1
  printf '%-4s %-28s %7s   %s\n' FAIL "$name" - "$why" | tee -a "$suite_dir/summary.txt"
}

have_exe() { [ -x "$bundle/bin/$1" ]; }

suite_begin() {
  suite_dir=$out_root/$1
  mkdir -p "$suite_dir"
  : > "$suite_dir/summary.txt"
  suite_failed=0
  echo "== $1 (logs in $suite_dir)"
  step nvidia-smi 30 machine.txt nvidia-smi \
    --query-gpu=name,clocks.max.sm,power.limit,driver_version,memory.total --format=csv
  {
    echo "date:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host:   $(uname -n)"
    head -3 "$bundle/MANIFEST" | tail -2
  } >> "$suite_dir/machine.txt"
}

suite_end() {
  if [ "$suite_failed" -ne 0 ]; then
    echo "== $1: FAILED (see $suite_dir/summary.txt)"
    return 1
  fi
  echo "== $1: all steps passed"
}

suite_tests() {
  suite_begin tests
  # The model tests generate tiny models with this script and Python, not the build machine's.
  local tiny_script=$bundle/scripts/make_tiny_model.py
  [ -f "$tiny_script" ] || tiny_script=$root/scripts/make_tiny_model.py
  export ANCHOR_TINY_MODEL_SCRIPT=$tiny_script
  ANCHOR_PYTHON=$(command -v python3 || true)
  export ANCHOR_PYTHON
  local t
  for t in "${gpu_tests[@]}"; do
    if have_exe "$t"; then
      step "$t" 300 "$t.log" "$bundle/run" "$t" --gtest_color=no
    else
      step_missing "$t" "not in the bundle"
    fi
  done
  suite_end tests
}

# The cuDNN baseline (torch SDPA) at the given lengths, into sdpa.log of the suite.
step_sdpa_baseline() {
  local sdpa=$bundle/bench/gpu/sdpa_baseline.py
  [ -f "$sdpa" ] || sdpa=$root/bench/gpu/sdpa_baseline.py
  if ! command -v python3 >/dev/null; then
    step_missing sdpa_baseline "python3 not found (the cuDNN baseline needs python3 with torch)"
  else
    step sdpa_baseline 240 sdpa.log env PYTHONUNBUFFERED=1 python3 "$sdpa" "$@"
  fi
}

suite_bench() {
  suite_begin bench
  # The baseline runs the lengths the benchmark runs.
  local lengths=("${bench_lengths[@]}") a
  for a in "$@"; do
    case "$a" in --lengths=*) IFS=, read -r -a lengths <<<"${a#--lengths=}" ;; esac
  done
  step_sdpa_baseline "${lengths[@]}"
  if have_exe anchor_kernel_bench; then
    local sdpa_args=()
    [ -s "$suite_dir/sdpa.log" ] && sdpa_args=(--sdpa_log="$suite_dir/sdpa.log")
    step anchor_kernel_bench 420 bench.log \
      "$bundle/run" anchor_kernel_bench --out="$suite_dir" "${sdpa_args[@]}" "$@"
    sed -n '/== summary ==/,$p' "$suite_dir/bench.log"
  else
    step_missing anchor_kernel_bench "not in the bundle"
  fi
  suite_end bench
}

suite_mass() {
  suite_begin mass
  local lengths=(32768 65536 131072) args=() a
  for a in "$@"; do
    case "$a" in
      --n=*) IFS=, read -r -a lengths <<<"${a#--n=}" ;;
      *) args+=("$a") ;;
    esac
  done
  step_sdpa_baseline "${lengths[@]}"
  if have_exe anchor_mass_bench; then
    local n
    for n in "${lengths[@]}"; do
      step "mass_$n" 300 "mass_$n.log" "$bundle/run" anchor_mass_bench --backend=cuda --n="$n" \
        --repeats=2 "${args[@]}"
    done
  else
    step_missing anchor_mass_bench "not in the bundle"
  fi
  suite_end mass
}

suite_service() {
  suite_begin service
  if ! have_exe anchorserve || ! have_exe anchorctl; then
    step_missing service "anchorserve and anchorctl must both be in the bundle"
    suite_end service
    return
  fi
  local port_file
  port_file=$(mktemp)
  rm -f "$port_file"  # the server writes it once it is serving
  "$bundle/run" anchorserve --backend="${ANCHOR_SERVICE_BACKEND:-cuda}" --host=127.0.0.1 --grpc_port=0 --metrics_port=0 \
    --port_file="$port_file" > "$suite_dir/server.log" 2>&1 &
  local server_pid=$! waited=0
  # The port file appears once the server is SERVING (backend ready).
  while [ ! -s "$port_file" ] && kill -0 "$server_pid" 2>/dev/null && [ "$waited" -lt 600 ]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  if [ ! -s "$port_file" ]; then
    local why="not serving after 60 s"
    if kill -0 "$server_pid" 2>/dev/null; then
      kill -TERM "$server_pid" 2>/dev/null || true
    else
      why="exited before serving"
    fi
    wait "$server_pid" 2>/dev/null || true
    rm -f "$port_file"
    step_missing anchorserve_start "$why; see service/server.log"
    tail -5 "$suite_dir/server.log" | sed 's/^/    /' >&2
    suite_end service
    return
  fi
  local target
  target=127.0.0.1:$(sed -n 's/^grpc_port=//p' "$port_file")
  rm -f "$port_file"
  local ctl=("$bundle/run" anchorctl --target="$target")
  step health 30 health.log "${ctl[@]}" health
  step info 30 info.log "${ctl[@]}" info
  step attend_4k_bf16_d128 180 attend_4k_bf16_d128.log "${ctl[@]}" attend --seq_len=4096 \
    --q_heads=8 --kv_heads=2 --head_dim=128 --dtype=bf16 --verify
  step attend_5000_fp16_d64_head 180 attend_5000_fp16_d64_head.log "${ctl[@]}" attend \
    --seq_len=5000 --q_heads=8 --kv_heads=2 --head_dim=64 --dtype=fp16 --layout=head --verify
  step attend_16k_llama_bf16 300 attend_16k_llama_bf16.log "${ctl[@]}" attend --seq_len=16384 \
    --q_heads=32 --kv_heads=8 --head_dim=128 --dtype=bf16 --verify --recall
  step load_32x8k 300 load_32x8k.log "${ctl[@]}" load --requests=32 --concurrency=4 \
    --seq_len=8192 --q_heads=32 --kv_heads=8 --head_dim=128 --dtype=bf16
  if have_exe anchor_prefill_wire_bench; then
    # The client's Prefill download without an engine (RESULTS section 7): glibc's default trim
    # threshold, then anchorserve's and anchorctl's.
    step prefill_wire_default_malloc 300 prefill_wire_default_malloc.log "$bundle/run" \
      anchor_prefill_wire_bench --repeats=3
    step prefill_wire_trim_64m 300 prefill_wire_trim_64m.log env \
      GLIBC_TUNABLES=glibc.malloc.trim_threshold=67108864 "$bundle/run" anchor_prefill_wire_bench \
      --repeats=3
  fi
  # SIGTERM drains and exits 0; give it the drain timeout (30 s) and a little more.
  local start rc=0 secs
  start=$(date +%s.%N)
  kill -TERM "$server_pid"
  ( sleep 45 && kill -KILL "$server_pid" 2>/dev/null ) &
  local watchdog=$!
  wait "$server_pid" || rc=$?
  kill "$watchdog" 2>/dev/null || true
  wait "$watchdog" 2>/dev/null || true
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 0 ]; then
    printf '%-4s %-28s %7ss  %s\n' PASS sigterm_exit "$secs" service/server.log |
      tee -a "$suite_dir/summary.txt"
  else
    suite_failed=1
    printf '%-4s %-28s %7ss  %s (exit %s)\n' FAIL sigterm_exit "$secs" service/server.log "$rc" |
      tee -a "$suite_dir/summary.txt"
  fi
  suite_end service
}

suite_profile() {
  suite_begin profile
  local ncu
  ncu=$(command -v ncu || true)
  if [ -z "$ncu" ]; then
    for ncu in /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do [ -x "$ncu" ] && break; done
  fi
  if [ -z "$ncu" ] || [ ! -x "$ncu" ]; then
    step_missing ncu "Nsight Compute (ncu) not found"
  elif ! have_exe anchor_kernel_bench; then
    step_missing ncu "anchor_kernel_bench is not in the bundle"
  else
    step ncu 300 ncu.txt \
      env LD_LIBRARY_PATH="$bundle/lib:${CUDA_LIB_DIR:-/usr/local/cuda/lib64}" \
      "$ncu" --kernel-name regex:"AnchorKernel|StripeScoreKernel|WgmmaStripeKernel" --launch-count 2 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
      --section MemoryWorkloadAnalysis \
      "$bundle/bin/anchor_kernel_bench" --lengths=32768 --reps=1 --sweep_lengths= \
      --sample_rows=0 --out="$suite_dir"
  fi
  suite_end profile
}

cmd_run() {
  [ $# -ge 1 ] || die "usage: gpu.sh run tests|bench|service|all|profile|mass [ARGS...]"
  local suite=$1
  shift
  # The bundle: ANCHOR_BUNDLE, else the bundle this script was copied into, else .gpu/bundle.
  if [ -n "${ANCHOR_BUNDLE:-}" ]; then
    bundle=$ANCHOR_BUNDLE
  elif [ -x "$root/run" ] && [ -f "$root/MANIFEST" ]; then
    bundle=$root
  else
    bundle=$root/.gpu/bundle
  fi
  if [ ! -x "$bundle/run" ] || [ ! -d "$bundle/bin" ]; then
    die "no bundle at $bundle (make one with scripts/gpu.sh bundle, or set ANCHOR_BUNDLE)"
  fi
  bundle=$(cd "$bundle" && pwd)
  out_root=${OUT:-./gpu-out}
  mkdir -p "$out_root"
  out_root=$(cd "$out_root" && pwd)
  case "$suite" in
    tests | service | profile)
      [ $# -eq 0 ] || die "suite $suite takes no arguments"
      "suite_$suite"
      ;;
    bench) suite_bench "$@" ;;
    mass) suite_mass "$@" ;;
    all)
      local failed=()
      suite_tests || failed+=(tests)
      suite_service || failed+=(service)
      suite_bench "$@" || failed+=(bench)
      echo
      cat "$out_root"/{tests,service,bench}/summary.txt
      if [ ${#failed[@]} -gt 0 ]; then
        echo "gpu.sh: FAILED suites: ${failed[*]}"
        return 1
      fi
      echo "gpu.sh: all suites passed"
      ;;
    *) die "unknown suite: $suite (tests, bench, service, all, profile, mass)" ;;
  esac
}

# ---------------------------------------------------------------------------------------------

[ $# -ge 1 ] || { usage >&2; exit 2; }
command=$1
shift
case "$command" in
  build) cmd_build "$@" ;;
  bundle) cmd_bundle "$@" ;;
  run) cmd_run "$@" ;;
  -h | --help | help) usage ;;
  *) echo "gpu.sh: unknown command: $command" >&2; usage >&2; exit 2 ;;
esac
