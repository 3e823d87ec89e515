#!/bin/sh
# Runtime stage of both image targets: installs the library packages listed by the build stage
# (runtime-packages.txt next to this file) and adds the unprivileged user the server runs as.
set -eu
here=$(dirname "$0")
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2046  # one package name per line
apt-get install -y -qq --no-install-recommends $(cat "$here/runtime-packages.txt") >/dev/null
rm -rf /var/lib/apt/lists/*
# UID 10001: above the ranges distributions hand out (Ubuntu's images already use 1000).
useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
  --shell /usr/sbin/nologin anchorserve
# Mount point of the model folder (--model=/model); empty in the image.
install -d -m 0755 /model
