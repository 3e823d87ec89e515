#!/usr/bin/env bash
# Builds the Dockerfile's `cpu` target on a machine without a Docker daemon or registry access,
# then starts the image and probes it. Needs root and Debian's package archive.
#
#   1. base image: `debootstrap --variant=minbase bookworm`, trimmed like bookworm-slim, committed
#      with buildah as localhost/anchorserve-base:bookworm (no image is pulled);
#   2. `buildah bud --isolation=chroot --target cpu` with CPU_BASE set to that base;
#   3. the image's root is mounted (`buildah mount`) and its ENTRYPOINT, user and environment are
#      run in a chroot, in a private mount namespace, with the root read-only, a tmpfs at /tmp and
#      a tiny model mounted read-only at /model (as the Kubernetes manifests do), then probed with
#      the image's own anchorctl: --backend=cuda without a GPU exits 1 at start; then health
#      SERVING, an Attend verified, a Prefill, and SIGTERM during a request: the request succeeds,
#      the server logs its drain and exits 0.
#
#   scripts/build_image.sh [--tag=NAME:TAG] [--archive=FILE.tar] [--keep] [--probe_only]
#     --tag         image name (default localhost/anchorserve:cpu)
#     --archive     also write the image as a docker-archive (docker load / podman load)
#     --keep        keep the run folder (logs) and the image store (default: both removed on
#                   exit; the store holds several GiB)
#     --probe_only  skip steps 1-2: probe the image already in ANCHOR_IMAGE_STORE
# Environment: ANCHOR_IMAGE_WORK (work folder, default /var/tmp/anchorserve-image; the debootstrap
# tarball is cached there), ANCHOR_IMAGE_STORE (a buildah store to use and keep; default a fresh
# one in the run folder), ANCHOR_DEBIAN_MIRROR, ANCHOR_BUILD_JOBS (compile jobs, default all
# cores), ANCHOR_BUILD_LOCK (a file: the compile step runs under flock on it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=localhost/anchorserve:cpu
archive=""
keep=0
probe_only=0
for arg in "$@"; do
  case "$arg" in
    --tag=*) tag=${arg#--tag=} ;;
    --archive=*) archive=${arg#--archive=} ;;
    --keep) keep=1 ;;
    --probe_only) probe_only=1 ;;
    *)
      echo "build_image.sh: unknown argument $arg (see the comment at the top)" >&2
      exit 2
      ;;
  esac
done

die() {
  echo "build_image.sh: FAIL: $*" >&2
  exit 1
}
log() { echo "build_image.sh: [$(($(date +%s) - start))s] $*" >&2; }
start=$(date +%s)

[ "$(id -u)" -eq 0 ] || die "needs root (buildah with the vfs driver, chroot, mounts)"
"$root/scripts/install_deps.sh" image
for tool in buildah debootstrap unshare chroot python3; do
  command -v "$tool" >/dev/null ||
    die "$tool is missing (scripts/install_deps.sh image installs it)"
done

work=${ANCHOR_IMAGE_WORK:-/var/tmp/anchorserve-image}
mirror=${ANCHOR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
base_tag=localhost/anchorserve-base:bookworm
mkdir -p "$work"
run_dir=$(mktemp -d "$work/run.XXXXXX")
# A store of our own: nothing of the host's container storage is touched, and it goes away whole.
store=${ANCHOR_IMAGE_STORE:-$run_dir/store}
if [ "$probe_only" = 1 ] && [ -z "${ANCHOR_IMAGE_STORE:-}" ]; then
  die "--probe_only needs ANCHOR_IMAGE_STORE"
fi
store_args=(--root "$store/root" --runroot "$store/run" --storage-driver vfs)
bh() { buildah "${store_args[@]}" "$@"; }

server_pid=""
client_pid=""
containers=()
cleanup() {
  local rc=$?
  set +e
  for pid in $client_pid $server_pid; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid"
      wait "$pid" 2>/dev/null
    fi
  done
  for ctr in "${containers[@]}"; do
    bh umount "$ctr" >/dev/null 2>&1
    bh rm "$ctr" >/dev/null 2>&1
  done
  if [ "$keep" = 1 ] || [ -n "${ANCHOR_IMAGE_STORE:-}" ]; then
    echo "build_image.sh: image store kept: ANCHOR_IMAGE_STORE=$store" \
      "(buildah ${store_args[*]} images)" >&2
  else
    bh rmi --all --force >/dev/null 2>&1
  fi
  if [ "$keep" = 1 ]; then
    echo "build_image.sh: logs kept in $run_dir" >&2
  else
    rm -rf "$run_dir"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 1. base image ------------------------------------------------------------------------------
if [ "$probe_only" = 0 ]; then
rootfs_tar=$work/bookworm-minbase.tar
if [ ! -s "$rootfs_tar" ]; then
  log "debootstrap bookworm from $mirror"
  rootfs=$run_dir/rootfs
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$run_dir/debootstrap.log" 2>&1 ||
    die "debootstrap failed; last lines of its log:$(echo; tail -n 20 "$run_dir/debootstrap.log")"
  # What the slim images leave out: documentation, manuals, translations, apt's lists.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${ANCHOR_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main
EOF
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
  rm -rf "$rootfs"/usr/share/{man,info,locale}/* "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" --numeric-owner -cf "$rootfs_tar.tmp" .
  mv "$rootfs_tar.tmp" "$rootfs_tar"
  rm -rf "$rootfs"
else
  log "debootstrap tarball cached: $rootfs_tar (delete it to refresh)"
fi
base_ctr=$(bh from scratch)
containers+=("$base_ctr")
base_mnt=$(bh mount "$base_ctr")
tar -C "$base_mnt" --numeric-owner -xf "$rootfs_tar"
bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd /bin/bash --os linux --arch amd64 "$base_ctr"
bh commit --quiet "$base_ctr" "$base_tag" >/dev/null
log "base image $base_tag committed"

# ---- 2. the cpu target --------------------------------------------------------------------------
bud=(buildah "${store_args[@]}" bud --isolation=chroot --format=docker --pull=never --target=cpu
  --build-arg "CPU_BASE=$base_tag" --build-arg "ANCHOR_BUILD_JOBS=${ANCHOR_BUILD_JOBS:-0}"
  -f "$root/Dockerfile" -t "$tag" "$root")
log "buildah bud --target=cpu -t $tag"
if [ -n "${ANCHOR_BUILD_LOCK:-}" ]; then bud=(flock "$ANCHOR_BUILD_LOCK" "${bud[@]}"); fi
"${bud[@]}" >"$run_dir/bud.log" 2>&1 ||
  die "buildah bud failed; last lines of its log:$(echo; tail -n 40 "$run_dir/bud.log")"
grep -E '^runtime packages:' "$run_dir/bud.log" | sed 's/^/  /' >&2 || true
log "image built: $(bh images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$tag")"
if [ -n "$archive" ]; then
  rm -f "$archive"
  bh push --quiet "$tag" "docker-archive:$archive:$tag" || die "cannot write $archive"
  log "image written to $archive"
fi
fi  # probe_only

# ---- 3. start the image's entrypoint and probe it -----------------------------------------------
image_json=$(bh inspect --type image "$tag") || die "no image $tag in the store"
# config_field EXPR: a Python expression over c, the image's OCI config.
config_field() {
  python3 -c 'import json, sys
c = json.loads(sys.argv[1])["OCIv1"]["config"]
print(eval(sys.argv[2]))' \
    "$image_json" "$1"
}
mapfile -t entrypoint < <(config_field '"\n".join(c.get("Entrypoint") or [])')
mapfile -t image_env < <(config_field '"\n".join(c.get("Env") or [])')
user=$(config_field 'c.get("User", "")')
[ ${#entrypoint[@]} -gt 0 ] || die "the image has no ENTRYPOINT"
case "$user" in "" | 0 | 0:* | root | root:*) die "the image runs as root (USER '$user')" ;; esac
case "$user" in *:*) ;; *) user=$user:$user ;; esac

ctr=$(bh from --pull=never "$tag")
containers+=("$ctr")
mnt=$(bh mount "$ctr")
[ -d "$mnt/model" ] || die "the image has no /model mount point"
model=$run_dir/model
/usr/bin/python3 "$root/scripts/make_tiny_model.py" --preset=llama3-tiny --out="$model" >/dev/null ||
  die "cannot write the tiny model (python3-numpy missing? scripts/install_deps.sh installs it)"
# The server runs as the image's user: the model and the folders above it must be readable.
chmod 0755 "$run_dir"
chmod -R a+rX "$model"

# in_image USER:GROUP CMD...: runs CMD as the image would, on the host's network: chrooted into the
# mounted image in a private mount namespace (its mounts vanish with it) with the root read-only,
# /dev and /proc from the host, a tmpfs /tmp and the model read-only at /model. It replaces the
# calling shell (exec; unshare, sh and chroot exec one another too), so call it in a subshell:
# `in_image ... &` makes $! the command's own pid.
in_image() {
  local as=$1
  shift
  # shellcheck disable=SC2016  # the script runs in the child shell, with its own $1...
  exec unshare --mount --propagation private -- /bin/sh -ec '
    root=$1 model=$2 as=$3; shift 3
    mount --bind "$root" "$root"
    mount -o remount,bind,ro "$root"
    mount --rbind /dev "$root/dev"
    mount -t proc proc "$root/proc"
    mount -t tmpfs -o size=64m,mode=1777 tmpfs "$root/tmp"
    mount --bind "$model" "$root/model"
    mount -o remount,bind,ro "$root/model"
    exec chroot --userspec="$as" "$root" "$@"' sh "$mnt" "$model" "$as" \
    env -i "${image_env[@]}" "$@"
}
ctl() ( in_image "$user" anchorctl --target="127.0.0.1:$grpc_port" "$@"; )

# What the Kubernetes GPU overlays rely on: --backend=cuda without a usable GPU (here: a build
# without CUDA) stops the server at start, never serving on the CPU.
in_image "$user" "${entrypoint[@]}" --grpc_port=0 --metrics_port=-1 --backend=cuda \
  >"$run_dir/cuda.log" 2>&1 &
server_pid=$!
for _ in $(seq 300); do
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.2
done
kill -0 "$server_pid" 2>/dev/null && die "--backend=cuda without a GPU is still running after 60 s"
cuda_rc=0
wait "$server_pid" || cuda_rc=$?
server_pid=""
if [ "$cuda_rc" -ne 1 ] || ! grep -q 'cannot create backend --backend=cuda' "$run_dir/cuda.log"; then
  die "--backend=cuda without a GPU did not fail at start (exit $cuda_rc):$(echo; cat "$run_dir/cuda.log")"
fi
log "probe 0/4 --backend=cuda without a GPU: exit 1 before serving"

server_log=$run_dir/server.log
log "starting the entrypoint as $user: ${entrypoint[*]} --model=/model (read-only root)"
in_image "$user" "${entrypoint[@]}" --grpc_port=0 --metrics_port=0 \
  --port_file=/tmp/anchorserve.ports --model=/model >"$server_log" 2>&1 &
server_pid=$!
# The port file lies in the server's own /tmp, reachable through its /proc root.
port_file=/proc/$server_pid/root/tmp/anchorserve.ports
for _ in $(seq 600); do
  [ -s "$port_file" ] && break
  kill -0 "$server_pid" 2>/dev/null || die "the server exited during start:$(echo; cat "$server_log")"
  sleep 0.2
done
[ -s "$port_file" ] || die "the server did not start serving within 120 s:$(echo; cat "$server_log")"
grpc_port=$(sed -n 's/^grpc_port=//p' "$port_file")
metrics_port=$(sed -n 's/^metrics_port=//p' "$port_file")
log "serving on gRPC port $grpc_port, metrics port $metrics_port"

health=$(ctl health) || die "anchorctl health: $health"
[ "$health" = SERVING ] || die "health is '$health', expected SERVING"
log "probe 1/4 health: $health"
attend_probe() { ctl attend --seq_len=512 --q_heads=4 --kv_heads=2 --head_dim=64 --verify; }
if ! attend_probe >"$run_dir/attend.log" 2>&1; then
  # A client whose connection could not be set up (seen once on the 2-core CI machine right after
  # a successful health call, with the server still up) gets one more try; any other failure, or
  # a second one, fails the probe.
  if ! grep -q 'connections to all backends failing' "$run_dir/attend.log" ||
    ! kill -0 "$server_pid" 2>/dev/null; then
    die "Attend failed:$(echo; cat "$run_dir/attend.log")"
  fi
  log "probe 2/4: the Attend client could not connect ($(grep -m1 'unavailable' "$run_dir/attend.log")); trying once more"
  attend_probe >"$run_dir/attend.log" 2>&1 || die "Attend failed:$(echo; cat "$run_dir/attend.log")"
fi
log "probe 2/4 Attend answered and verified: $(grep -m1 -i 'density' "$run_dir/attend.log" || true)"
ctl prefill --random_ids=64 --logits=topk:1 >"$run_dir/prefill.log" 2>&1 ||
  die "Prefill failed:$(echo; cat "$run_dir/prefill.log")"
log "probe 3/4 Prefill from the model at /model answered"

# SIGTERM while a request is in flight: the request still succeeds, the server drains, exits 0.
ctl attend --seq_len=16384 --q_heads=8 --kv_heads=2 --head_dim=128 >"$run_dir/drain_attend.log" 2>&1 &
client_pid=$!
# One poller (an interpreter start per poll can miss a short request): prints the in-flight
# count once it is >= 1, or the last count when the client has exited or 30 s have passed.
inflight=$(python3 - "$metrics_port" "$client_pid" <<'EOF' || echo 0
import os, sys, time, urllib.request
port, client = sys.argv[1], int(sys.argv[2])
def client_alive():
    try:
        os.kill(client, 0)
        return True
    except OSError:
        return False
deadline = time.time() + 30
seen = 0
while time.time() < deadline and client_alive():
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        seen = next((int(float(l.split()[1])) for l in text.splitlines()
                     if l.startswith("anchorserve_inflight_requests")), 0)
    except OSError:
        seen = 0
    if seen >= 1:
        break
    time.sleep(0.02)
print(seen)
EOF
)
[ "$inflight" -ge 1 ] || die "no request was seen in flight before SIGTERM"
kill -TERM "$server_pid"
server_rc=0
wait "$server_pid" || server_rc=$?
server_pid=""
client_rc=0
wait "$client_pid" || client_rc=$?
client_pid=""
[ "$server_rc" -eq 0 ] || die "the server exited with $server_rc after SIGTERM:$(echo; tail -n 20 "$server_log")"
grep -q 'draining' "$server_log" || die "no drain line in the server log"
grep -q 'drained; exiting' "$server_log" || die "no 'drained; exiting' line in the server log"
[ "$client_rc" -eq 0 ] ||
  die "the request in flight at SIGTERM failed:$(echo; cat "$run_dir/drain_attend.log")"
log "probe 4/4 SIGTERM with a request in flight: request succeeded, server drained and exited 0"
sed 's/^/  server: /' "$server_log" >&2
log "PASS: $tag built and probed in $(($(date +%s) - start)) s"
