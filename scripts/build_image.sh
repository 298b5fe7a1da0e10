#!/usr/bin/env bash
# Build the Dockerfile without a Docker daemon, then run the pipeline's first stage inside the image.
#   make image                                           # = bash scripts/build_image.sh
#   BASE_IMAGE=python:3.11-slim bash scripts/build_image.sh   # from a registry base instead of debootstrap
# Needs root and buildah (Debian/Ubuntu: apt-get install -y buildah debootstrap).
#
# 1. Base: unless BASE_IMAGE is set, a minimal Debian bookworm made by debootstrap from the Debian
#    mirror and imported once as localhost/slotwise-base:bookworm (reused by later builds).
# 2. buildah bud --isolation chroot --layers -t $IMAGE. torch==2.13.0 comes from local wheels when pip
#    is configured with a find-links folder holding it (mounted at /wheels), else from TORCH_INDEX;
#    a CA bundle pip is configured with (cert) is mounted for the build too.
# 3. In the image, with buildah run: `slotwise retrofit` (the embedded SmolLM2 default),
#    `dvc repro retrofit` (the DVC project in /app) and `slotwise report`; then the image size.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/slotwise:cpu}
WORK=${SLOTWISE_IMAGE_WORK:-/var/tmp/slotwise-image}
BASE_TAG=localhost/slotwise-base:bookworm
command -v buildah >/dev/null || { echo "error: buildah not found (apt-get install -y buildah debootstrap)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "error: run as root (buildah --isolation chroot)" >&2; exit 2; }
t0=$(date +%s)
say() { echo "build_image [$(( $(date +%s) - t0 )) s]: $*"; }

base=${BASE_IMAGE:-}
if [ -z "$base" ]; then
  base=$BASE_TAG
  if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "error: debootstrap not found (apt-get install -y debootstrap)" >&2; exit 2; }
    mkdir -p "$WORK"
    if [ ! -x "$WORK/rootfs/usr/bin/apt-get" ]; then
      say "debootstrap bookworm into $WORK/rootfs"
      rm -rf "$WORK/rootfs"
      debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log"
    fi
    say "importing $WORK/rootfs as $base"
    tar -C "$WORK/rootfs" -cf "$WORK/rootfs.tar" .
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$WORK/rootfs.tar" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
    buildah commit --rm -q "$ctr" "$base" >/dev/null
    rm -f "$WORK/rootfs.tar"
  fi
fi

args=(--build-arg "BASE=$base")
wheels=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
wheels=${wheels%% *}
if [ -n "$wheels" ] && ls "$wheels"/torch-2.13.0*.whl >/dev/null 2>&1; then
  say "torch from the local wheels in $wheels (mounted at /wheels)"
  args+=(-v "$wheels:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg TORCH_INDEX=)
fi
cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  say "pip trusts the CA bundle $cert (mounted at /build-ca.crt)"
  args+=(-v "$cert:/build-ca.crt:ro" --build-arg PIP_CERT=/build-ca.crt)
fi
say "buildah bud -t $IMAGE (base $base)"
buildah bud --isolation chroot --layers -t "$IMAGE" "${args[@]}" -f Dockerfile .

say "running the first stage inside $IMAGE"
ctr=$(buildah from "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null' EXIT
inside() { echo "+ $*"; buildah run --isolation chroot "$ctr" -- "$@"; }
inside id -un
inside slotwise retrofit --out /tmp/retrofit
inside dvc repro retrofit
inside slotwise report
say "done: $IMAGE, $(buildah images --format '{{.Size}}' "$IMAGE" | head -1)"
