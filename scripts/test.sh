#!/usr/bin/env bash
# One command to run the tests on a fresh Debian 12 / Ubuntu 24.04 machine: installs what is
# missing, checks formatting (check_format.sh) and lock annotations (check_thread_safety.sh),
# builds everything (warnings are errors), runs ctest (GPU tests skip themselves without a
# device). Extra arguments go to ctest, e.g. -L cpu, -L e2e, -R Batcher.
# ANCHOR_SKIP_CHECKS=1 skips the two source checks (CI never sets it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install_deps.sh"
if [ "${ANCHOR_SKIP_CHECKS:-0}" != 1 ]; then
  "$root/scripts/check_format.sh"
  "$root/scripts/check_thread_safety.sh"
fi
"$root/scripts/build.sh"
cd "${ANCHOR_BUILD_DIR:-$root/build}"
ctest --output-on-failure --timeout 900 -j "${ANCHOR_TEST_JOBS:-2}" "$@"
