#!/usr/bin/env bash
# One command to run the service on a fresh Debian 12 / Ubuntu 24.04 machine: installs what is
# missing, builds, and starts anchorserve (CUDA backend when a GPU is present, CPU otherwise).
# Extra arguments are passed to anchorserve, e.g. --grpc_port=50051 --backend=cpu.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install_deps.sh"
"$root/scripts/build.sh" anchorserve anchorctl
exec "${ANCHOR_BUILD_DIR:-$root/build}/bin/anchorserve" "$@"
