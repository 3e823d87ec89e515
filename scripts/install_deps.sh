#!/usr/bin/env bash
# Installs the build and test dependencies (Debian 12 / Ubuntu 24.04 packages; the python3-* ones
# run the Python client's tests, kubectl and python3-yaml the manifest tests of deploy/k8s).
# Idempotent and quiet when everything is already there.
#   install_deps.sh          what scripts/test.sh and scripts/run_server.sh need
#   install_deps.sh image    also what scripts/build_image.sh needs (buildah, debootstrap)
set -euo pipefail
packages=(build-essential cmake ninja-build ccache pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev libgtest-dev libgmock-dev
  libblis-pthread-dev nlohmann-json3-dev
  python3 python3-numpy python3-grpcio python3-protobuf python3-yaml
  # scripts/make_test_certs.sh (the TLS end-to-end tests and the README's TLS setup).
  openssl
  # Source checks: check_format.sh (clang-format pinned to 14: other releases format the same
  # code differently) and check_thread_safety.sh (any clang).
  clang-format-14 clang
  # scripts/fuzz.sh: libFuzzer and clang's sanitizer runtimes (only recommended by clang, and
  # recommendations are not installed here).
  clang-14 libclang-rt-14-dev
  # scripts/sanitizers/build_tsan_deps.sh: gRPC's code generator links libprotoc.
  libprotoc-dev)
# The manifest tests render deploy/k8s with `kubectl kustomize`; any kubectl will do, so one that
# is already installed (e.g. from another vendor's package) is left alone.
if ! command -v kubectl >/dev/null; then packages+=(kubernetes-client); fi
case "${1:-}" in
  "") ;;
  image) packages+=(buildah debootstrap) ;;
  *)
    echo "install_deps.sh: unknown argument $1 (none, or: image)" >&2
    exit 2
    ;;
esac
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
echo "install_deps: installing ${missing[*]}" >&2
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
