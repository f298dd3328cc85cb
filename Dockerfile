# syntax=docker/dockerfile:1
#
# Two images from one file:
#
#   docker build --target operator -t finetune-operator/operator:0.1.0 .
#   docker build --target trainer  -t finetune-operator/trainer:0.1.0-xpu .
#   docker build --target trainer  --build-arg DEVICE=cuda -t finetune-operator/trainer:0.1.0-cuda .
#   docker build --target trainer  --build-arg DEVICE=cpu  -t finetune-operator/trainer:0.1.0-cpu .
#
# operator: python slim + the `operator` extra (kopf, kubernetes, prometheus-client). Never torch:
#           a build step fails if torch got in.
# trainer:  the Intel GPU user-space runtime (Level Zero, the compute runtime) on Debian, and
#           upstream PyTorch from the index of the chosen DEVICE (xpu: PyTorch's own XPU wheels,
#           with the oneAPI runtime and the xccl collectives inside; cuda; cpu), then the
#           `trainer` extra. The pods run `python -m finetune_trainer.launch ... --config ...`,
#           which starts a rank per visible device through torchrun.
# Both run as uid/gid 1000 with a read-only root filesystem in mind (HOME=/tmp).
# tests/unit/test_dockerfile.py checks that the install steps use the extras of pyproject.toml.

ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=trixie

# -- the project wheel, built once for both images --------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trainer ./trainer
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- operator: slim, no torch ---------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
# Versions: the project wheel is this commit; its dependencies are bounded in pyproject.toml.
# The wheel is copied, not bind-mounted (RUN --mount=type=bind,from=wheel): podman/buildah
# mounts nothing when the wheel stage comes from its layer cache (podman#16281), and does not
# rebuild the mounting step when the wheel changes (buildah#4522); a COPY is keyed by content.
# It costs the image one small file.
COPY --from=wheel /wheels/ /wheels/
# hadolint ignore=DL3013
RUN set -- /wheels/finetune_operator-*.whl \
 && pip install --no-cache-dir "$1[operator]" \
 && rm -rf /wheels \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the operator image" >&2; exit 1; fi
RUN groupadd --gid 1000 finetune \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin finetune
USER 1000:1000
EXPOSE 9090
ENTRYPOINT ["finetune-operator"]
CMD ["run"]

# -- Intel GPU base: the user-space driver stack every XPU process needs ----------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS trainer-base
ARG DEVICE=xpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# xpu: the Level Zero loader and Intel GPU driver (libze1, libze-intel-gpu1) and the OpenCL
# runtime (intel-opencl-icd); the kernel driver (i915 or xe) and /dev/dri come from the node
# through the Intel GPU device plugin. cuda: the driver comes from the node (NVIDIA container
# toolkit), the CUDA runtime from the PyTorch wheels. cpu: nothing.
RUN packages=(ca-certificates) \
 && if [ "${DEVICE}" = "xpu" ]; then packages+=(libze1 libze-intel-gpu1 intel-opencl-icd); fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends "${packages[@]}" \
 && rm -rf /var/lib/apt/lists/*

# -- trainer ----------------------------------------------------------------------------------------
FROM trainer-base AS trainer
ARG DEVICE=xpu
# PyTorch >= 2.8: XPU wheels carry the xccl backend (multi-node collectives over oneCCL).
ARG TORCH_VERSION=2.8.0
# The extras to install: `trainer` always; add `deepspeed` (full fine-tuning with ZeRO) or
# `fast` (Liger kernels, CUDA) as needed, e.g. --build-arg EXTRAS=trainer,fast.
ARG EXTRAS=trainer
# The root filesystem is read-only in the pods and /tmp is a writable volume there: every cache
# is named under it, so that none depends on HOME (the pods set HF_HOME to the output volume,
# so that a model is fetched once per job).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    FINETUNE_DEVICE=${DEVICE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# torch first, pinned, from the index of the device, so that the extra's `torch>=` finds it
# installed; the rest is bounded in pyproject.toml. torch has its own layer: a change of the
# project reinstalls the extra, not the several GB of torch.
RUN case "${DEVICE}" in \
      xpu) index=https://download.pytorch.org/whl/xpu ;; \
      cuda) index=https://download.pytorch.org/whl/cu128 ;; \
      cpu) index=https://download.pytorch.org/whl/cpu ;; \
      *) echo "DEVICE must be xpu, cuda or cpu, not ${DEVICE}" >&2; exit 1 ;; \
    esac \
 && pip install --no-cache-dir --index-url "${index}" "torch==${TORCH_VERSION}"
# The wheel is copied, not bind-mounted: see the operator stage.
COPY --from=wheel /wheels/ /wheels/
# hadolint ignore=DL3013
RUN set -- /wheels/finetune_operator-*.whl \
 && pip install --no-cache-dir "$1[${EXTRAS}]" \
 && rm -rf /wheels \
 && python -c "import torch, finetune_trainer; print('torch', torch.__version__)"
RUN groupadd --gid 1000 finetune \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin finetune
USER 1000:1000
WORKDIR /tmp
EXPOSE 29500
ENTRYPOINT []
CMD ["finetune-train", "--help"]
