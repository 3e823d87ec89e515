#!/usr/bin/env bash
# One command to run the tests on a fresh Debian 12 / Ubuntu 24.04 machine: installs what is
# missing, builds everything, runs ctest (GPU tests skip themselves without a device).
# Extra arguments go to ctest, e.g. -L cpu, -L e2e, -R Batcher.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install_deps.sh"
"$root/scripts/build.sh"
cd "${ANCHOR_BUILD_DIR:-$root/build}"
ctest --output-on-failure --timeout 900 -j "${ANCHOR_TEST_JOBS:-2}" "$@"
