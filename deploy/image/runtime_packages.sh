#!/bin/sh
# Prints, one per line, the packages that own the shared libraries the given executables load
# (ldd), so that the runtime stage installs the same library packages on Debian 12 and on Ubuntu
# 24.04 (whose names differ, e.g. libgrpc++1.51 and libgrpc++1.51t64) without listing them twice.
# Libraries of the CUDA toolkit are skipped: the CUDA runtime image provides them.
set -eu
libs=$(ldd "$@" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u)
missing=$(ldd "$@" | awk '/not found/ { print $1 }' | sort -u)
if [ -n "$missing" ]; then
  echo "runtime_packages.sh: unresolved libraries: $missing" >&2
  exit 1
fi
for lib in $libs; do
  case "$lib" in /usr/local/cuda*) continue ;; esac
  real=$(readlink -f "$lib")
  # With merged /usr a library may be registered under /lib or /usr/lib: try both spellings.
  owner=""
  for candidate in "$lib" "$real" "/usr$lib" "/usr$real" "${lib#/usr}" "${real#/usr}"; do
    owner=$(dpkg-query -S "$candidate" 2>/dev/null | head -n1 | cut -d: -f1) && [ -n "$owner" ] && break
  done
  if [ -z "$owner" ]; then
    echo "runtime_packages.sh: no package owns $lib" >&2
    exit 1
  fi
  echo "$owner"
done | sort -u
