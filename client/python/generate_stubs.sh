#!/usr/bin/env bash
# Generates the Python protobuf and gRPC modules of anchorserve.v1 with protoc and Debian's
# grpc_python_plugin (package protobuf-compiler-grpc).
#
#   client/python/generate_stubs.sh [OUT_DIR]
#
# OUT_DIR defaults to client/python/anchorserve_client/_gen (git-ignored), where the package looks
# for them; elsewhere, point ANCHORSERVE_CLIENT_GEN_DIR at OUT_DIR. PROTOC and GRPC_PYTHON_PLUGIN
# override the tools.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
proto_root=$(cd "$here/../../proto" && pwd)
out=${1:-$here/anchorserve_client/_gen}
protoc=${PROTOC:-protoc}
plugin=${GRPC_PYTHON_PLUGIN:-$(command -v grpc_python_plugin || true)}
if [ -z "$plugin" ] || [ ! -x "$plugin" ]; then
  echo "generate_stubs: grpc_python_plugin not found (apt-get install protobuf-compiler-grpc)" >&2
  exit 1
fi
mkdir -p "$out"
"$protoc" --proto_path="$proto_root" --python_out="$out" --grpc_python_out="$out" \
  --plugin=protoc-gen-grpc_python="$plugin" \
  "$proto_root/anchorserve/v1/anchorserve.proto" "$proto_root/anchorserve/v1/prefill.proto"
