#!/usr/bin/env bash
# Clang's thread-safety analysis over the sources that use Abseil's lock annotations
# (ABSL_GUARDED_BY, ABSL_EXCLUSIVE_LOCKS_REQUIRED, ...): a syntax-only pass with
# -Wthread-safety -Werror=thread-safety, using the include paths and definitions of the build's
# compile_commands.json. Fails (exit 1, naming the files) on any violation.
#
#   scripts/check_thread_safety.sh               # the annotated sources (see below)
#   scripts/check_thread_safety.sh FILE.cc ...   # just these
#
# The annotated sources: every tracked .cc file that has an annotation, the .cc file next to
# each annotated header (foo.h -> foo.cc), and, for headers without one, every .cc that includes
# them. Only files in compile_commands.json are checked (a CPU-only build has no CUDA sources).
#
# It configures $ANCHOR_BUILD_DIR (default build/) with scripts/build.sh and builds the target
# anchor_codegen there (protoc only, no compile) so that generated headers exist.
# Environment: ANCHOR_BUILD_DIR, CLANGXX (default clang++), ANCHOR_CHECK_JOBS (default nproc).
set -euo pipefail

usage() {
  sed -n '2,17s/^# \{0,1\}//p' "$0"
}
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  -*) echo "check_thread_safety: unknown option: $1" >&2; usage >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build_dir=${ANCHOR_BUILD_DIR:-$root/build}
clangxx=${CLANGXX:-clang++}
jobs=${ANCHOR_CHECK_JOBS:-$(nproc)}
if ! command -v "$clangxx" >/dev/null; then
  echo "check_thread_safety: $clangxx not found (scripts/install_deps.sh installs clang)" >&2
  exit 2
fi

annotations='ABSL_(GUARDED_BY|PT_GUARDED_BY|EXCLUSIVE_LOCKS_REQUIRED|SHARED_LOCKS_REQUIRED|LOCKS_EXCLUDED|EXCLUSIVE_LOCK_FUNCTION|SHARED_LOCK_FUNCTION|UNLOCK_FUNCTION|ASSERT_EXCLUSIVE_LOCK|LOCK_RETURNED|ACQUIRED_AFTER|ACQUIRED_BEFORE)\('
if [ $# -gt 0 ]; then
  sources=("$@")
else
  sources=()
  while IFS= read -r f; do sources+=("$f"); done < <(git grep -l -E "$annotations" -- '*.cc')
  while IFS= read -r header; do
    companion=${header%.h}.cc
    if [ -f "$companion" ]; then
      sources+=("$companion")
    else
      while IFS= read -r f; do sources+=("$f"); done < <(git grep -l -F "#include \"$header\"" -- '*.cc')
    fi
  done < <(git grep -l -E "$annotations" -- '*.h')
  mapfile -t sources < <(printf '%s\n' "${sources[@]}" | sort -u)
fi
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_thread_safety: no annotated sources found" >&2
  exit 2
fi

# Configure (with compile_commands.json) and generate the protobuf headers.
ANCHOR_BUILD_DIR=$build_dir "$root/scripts/build.sh" anchor_codegen >/dev/null
db=$build_dir/compile_commands.json
[ -f "$db" ] || { echo "check_thread_safety: $db missing after configuring" >&2; exit 2; }

# CMake writes one "command" line followed by its "file" line per entry. Print the compile
# command of $1 (absolute path) with the JSON string escapes undone.
command_for() {
  awk -v file="$1" '
    /^  "command": "/ { cmd = substr($0, 15); sub(/",?$/, "", cmd) }
    /^  "file": "/ { f = substr($0, 12); sub(/",?$/, "", f); if (f == file) { print cmd; exit } }
  ' "$db" | sed -e 's/\\"/"/g' -e 's/\\\\/\\/g'
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
checked=()
skipped=()
for src in "${sources[@]}"; do
  abs=$root/${src#"$root"/}
  cmd=$(command_for "$abs")
  if [ -z "$cmd" ]; then skipped+=("$src"); continue; fi
  # Keep what decides how the file parses: include paths, definitions, language standard. The
  # build's own warning flags (GCC's) stay out.
  args=()
  pending=""
  while IFS= read -r -d '' a; do
    if [ -n "$pending" ]; then args+=("$pending" "$a"); pending=""; continue; fi
    case "$a" in
      -isystem | -iquote | -I | -D | -include) pending=$a ;;
      -I* | -D* | -std=* | -isystem* | -iquote*) args+=("$a") ;;
    esac
  done < <(printf '%s\n' "$cmd" | xargs printf '%s\0')
  n=${#checked[@]}
  printf '%s\0' "$clangxx" -fsyntax-only -Wthread-safety -Werror=thread-safety "${args[@]}" \
    "$abs" > "$work/$n.cmd"
  printf '%s\n' "$src" > "$work/$n.src"
  checked+=("$src")
done
if [ ${#checked[@]} -eq 0 ]; then
  echo "check_thread_safety: none of ${sources[*]} is in $db" >&2
  exit 2
fi

# One clang process per file, $jobs at a time; each leaves its diagnostics in N.log and its
# exit status in N.rc.
run_one() {
  local n=$1 dir=$2
  local -a cmd
  mapfile -t -d '' cmd < "$dir/$n.cmd"
  if "${cmd[@]}" > "$dir/$n.log" 2>&1; then echo 0 > "$dir/$n.rc"; else echo $? > "$dir/$n.rc"; fi
}
export -f run_one
# shellcheck disable=SC2016  # $1 and $2 are bash -c's own arguments
seq 0 $((${#checked[@]} - 1)) | xargs -P "$jobs" -I{} bash -c 'run_one "$1" "$2"' _ {} "$work"

failed=()
for n in $(seq 0 $((${#checked[@]} - 1))); do
  if [ "$(cat "$work/$n.rc")" != 0 ]; then
    failed+=("${checked[$n]}")
    cat "$work/$n.log" >&2
  fi
done
if [ ${#skipped[@]} -ne 0 ]; then
  echo "check_thread_safety: not in this build, skipped: ${skipped[*]}"
fi
if [ ${#failed[@]} -ne 0 ]; then
  echo "check_thread_safety: FAILED in ${#failed[@]} of ${#checked[@]} files: ${failed[*]}" >&2
  exit 1
fi
echo "check_thread_safety: ${#checked[@]} files clean: ${checked[*]}"
echo "check_thread_safety: analysed by $("$clangxx" --version | head -1)"
