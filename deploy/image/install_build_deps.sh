#!/bin/sh
# Build dependencies of the image's build stages. The package names are the same on Debian 12
# (cpu target) and Ubuntu 24.04 (the CUDA images of the gpu target), so both stages run this file.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  build-essential cmake ninja-build pkg-config \
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
  libabsl-dev prometheus-cpp-dev libgtest-dev libgmock-dev \
  libblis-pthread-dev nlohmann-json3-dev >/dev/null
rm -rf /var/lib/apt/lists/*
