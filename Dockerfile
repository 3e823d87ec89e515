# anchorserve image: CUDA backend on a GPU node, CPU backend elsewhere.
#   docker build -t anchorserve .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 anchorserve
# Build stage: nvcc + the Ubuntu 24.04 -dev packages.
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04 AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libabsl-dev prometheus-cpp-dev libgtest-dev libgmock-dev \
      libblis-pthread-dev nlohmann-json3-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DANCHOR_ENABLE_CUDA=ON \
      -DANCHOR_BUILD_TESTS=OFF -DANCHOR_BUILD_BENCH=OFF \
    && cmake --build build --target anchorserve anchorctl \
    && strip build/bin/anchorserve build/bin/anchorctl

# Runtime stage: shared libraries only; the CUDA runtime is linked statically, cuBLASLt (the
# prefill engine's GEMMs) comes with the runtime image, the driver from the host through the
# NVIDIA container toolkit.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends \
      libgrpc++1.51t64 libprotobuf32t64 libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 \
      libabsl20220623t64 libblis4-pthread \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/bin/anchorserve /src/build/bin/anchorctl /usr/local/bin/
# UID 1000 is taken by the image's `ubuntu` user; run as a dedicated unprivileged one.
RUN useradd --system --uid 10001 --no-create-home anchorserve
USER 10001:10001
EXPOSE 50051 9464
# grpc.health.v1 Check of the whole server: healthy only when SERVING (not starting or draining).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s \
  CMD ["anchorctl", "--target=127.0.0.1:50051", "--deadline_s=4", "health"]
# Exec form so SIGTERM reaches the server and starts its drain.
ENTRYPOINT ["anchorserve", "--host=0.0.0.0", "--grpc_port=50051", "--metrics_port=9464"]
