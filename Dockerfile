# anchorserve images. Two targets, built the same way from different bases:
#   cpu  Debian 12 (bookworm-slim), CPU backend and CPU prefill engine
#   gpu  CUDA 13 on Ubuntu 24.04, CUDA backend (H100/H200, sm_90) and CUDA prefill engine
# The build and runtime steps of the two are line for line the same (deploy/image/*.sh); only the
# base images and ANCHOR_ENABLE_CUDA differ (tests/deploy checks this).
#
#   scripts/build_image.sh                                        # cpu, here: buildah, no daemon
#   docker build --target cpu -t REGISTRY/anchorserve:TAG-cpu .    # where images can be pulled
#   docker build --target gpu -t REGISTRY/anchorserve:TAG-gpu .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 -v /models/llama:/model:ro \
#     REGISTRY/anchorserve:TAG-gpu --backend=cuda --model=/model
#
# The entrypoint sets the listen address and ports; arguments are appended (a later flag wins).
# The model folder is mounted read-only at /model and passed with --model=/model.
ARG CPU_BASE=debian:bookworm-slim
ARG CUDA_BUILD_BASE=nvidia/cuda:13.0.0-devel-ubuntu24.04
ARG CUDA_RUNTIME_BASE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---- cpu ----------------------------------------------------------------------------------------
FROM ${CPU_BASE} AS cpu-build
ARG ANCHOR_BUILD_JOBS=0
COPY deploy/image/install_build_deps.sh /src/deploy/image/
RUN ["/src/deploy/image/install_build_deps.sh"]
COPY . /src
RUN ANCHOR_ENABLE_CUDA=OFF /src/deploy/image/build_server.sh /src /out

FROM ${CPU_BASE} AS cpu
COPY --from=cpu-build /out/ /usr/local/
RUN ["/usr/local/share/anchorserve/install_runtime.sh"]
USER 10001:10001
EXPOSE 50051 9464
# Docker only (Kubernetes uses its own probes): healthy while the server reports SERVING.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
  CMD ["anchorctl", "--target=127.0.0.1:50051", "--deadline_s=4", "health"]
# Exec form: SIGTERM reaches the server itself and starts its drain.
ENTRYPOINT ["anchorserve", "--host=0.0.0.0", "--grpc_port=50051", "--metrics_port=9464"]

# ---- gpu ----------------------------------------------------------------------------------------
# Cannot be built on machines that cannot pull nvidia/cuda. The CUDA runtime is linked statically;
# cuBLASLt comes with the runtime image, the driver (R580 or newer for CUDA 13) from the host
# through the NVIDIA container toolkit.
FROM ${CUDA_BUILD_BASE} AS gpu-build
ARG ANCHOR_BUILD_JOBS=0
COPY deploy/image/install_build_deps.sh /src/deploy/image/
RUN ["/src/deploy/image/install_build_deps.sh"]
COPY . /src
RUN ANCHOR_ENABLE_CUDA=ON /src/deploy/image/build_server.sh /src /out

FROM ${CUDA_RUNTIME_BASE} AS gpu
COPY --from=gpu-build /out/ /usr/local/
RUN ["/usr/local/share/anchorserve/install_runtime.sh"]
USER 10001:10001
EXPOSE 50051 9464
# Docker only (Kubernetes uses its own probes): healthy while the server reports SERVING.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
  CMD ["anchorctl", "--target=127.0.0.1:50051", "--deadline_s=4", "health"]
# Exec form: SIGTERM reaches the server itself and starts its drain.
ENTRYPOINT ["anchorserve", "--host=0.0.0.0", "--grpc_port=50051", "--metrics_port=9464"]
