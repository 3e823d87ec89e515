#!/usr/bin/env bash
# Checks that every tracked C/C++/CUDA file (*.h *.cc *.cu *.cuh *.inc) is formatted as
# clang-format (the repository's .clang-format, Google style) would format it.
#
#   scripts/check_format.sh          # list the files that differ, exit 1 if any
#   scripts/check_format.sh --fix    # rewrite them in place
#
# Environment: CLANG_FORMAT (default clang-format-14, else clang-format). The version is pinned
# because clang-format releases format the same code differently; install_deps.sh installs 14.
set -euo pipefail

usage() {
  sed -n '2,9s/^# \{0,1\}//p' "$0"
}

fix=0
case "${1:-}" in
  "") ;;
  --fix) fix=1 ;;
  -h | --help) usage; exit 0 ;;
  *) echo "check_format: unknown argument: $1" >&2; usage >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ -n "${CLANG_FORMAT:-}" ]; then
  clang_format=$CLANG_FORMAT
elif command -v clang-format-14 >/dev/null; then
  clang_format=clang-format-14
else
  clang_format=clang-format
fi
if ! command -v "$clang_format" >/dev/null; then
  echo "check_format: $clang_format not found (scripts/install_deps.sh installs clang-format-14)" >&2
  exit 2
fi

files=()
while IFS= read -r -d '' f; do
  # A file deleted in the work tree but still tracked is not ours to check.
  [ -f "$f" ] && files+=("$f")
done < <(git ls-files -z -- '*.h' '*.cc' '*.cu' '*.cuh' '*.inc')
if [ ${#files[@]} -eq 0 ]; then
  echo "check_format: no tracked C/C++/CUDA files" >&2
  exit 2
fi

if [ "$fix" = 1 ]; then
  "$clang_format" -i --style=file -- "${files[@]}"
  echo "check_format: formatted ${#files[@]} files"
  exit 0
fi

# One clang-format process for all files: --dry-run --Werror reports the first difference of each
# file as "FILE:LINE:COL: error: code should be clang-formatted".
report=$("$clang_format" --style=file --dry-run --Werror --ferror-limit=1 -- "${files[@]}" 2>&1) &&
  rc=0 || rc=$?
mapfile -t bad < <(printf '%s\n' "$report" |
  sed -n 's/^\(.*\):[0-9]*:[0-9]*: error: code should be clang-formatted.*/\1/p' | sort -u)
if [ "$rc" -ne 0 ] && [ ${#bad[@]} -eq 0 ]; then
  echo "check_format: $clang_format failed (exit $rc):" >&2
  printf '%s\n' "$report" >&2
  exit 2
fi
if [ ${#bad[@]} -ne 0 ]; then
  echo "check_format: ${#bad[@]} of ${#files[@]} files differ from $("$clang_format" --version | sed 's/.*version /clang-format /'):" >&2
  printf '  %s\n' "${bad[@]}" >&2
  echo "check_format: see the changes with 'clang-format FILE | diff -u FILE -'; apply them with scripts/check_format.sh --fix" >&2
  exit 1
fi
echo "check_format: ${#files[@]} files clean"
