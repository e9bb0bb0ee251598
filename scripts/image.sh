#!/usr/bin/env bash
# Build the worker's container image with podman (`make image`).
#
#   IMAGE       the tag to build                    [localhost/noetl-pgworker:dev]
#   IMAGE_BASE  `local`: a Debian bookworm base made here with debootstrap, and the wheels
#               built on this host first, so that the build needs no container registry and
#               no network inside it; or an image name, e.g. python:3.12-slim   [local]
#   EXTRAS      optional dependencies, e.g. '[duckdb]'                         []
#
# The local base is cached as build/container-base/bookworm-minbase.tar (made once, ~120 MB)
# and imported into podman's storage when missing there. Prints the build time and the size.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/noetl-pgworker:dev}
IMAGE_BASE=${IMAGE_BASE:-local}
EXTRAS=${EXTRAS:-}
PYTHON=${PYTHON:-.venv/bin/python}
LOCAL_BASE=localhost/noetl-pgworker-base:bookworm
CACHE=build/container-base
TARBALL=$CACHE/bookworm-minbase.tar
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/container/containers.conf}

for tool in podman; do
    command -v "$tool" >/dev/null || { echo "image.sh: $tool is not installed" >&2; exit 2; }
done

make_base_tarball() {
    command -v debootstrap >/dev/null || {
        echo "image.sh: debootstrap is not installed (needed for IMAGE_BASE=local)" >&2
        exit 2
    }
    local rootfs
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/noetl-pgworker-rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' RETURN
    echo "image.sh: debootstrap bookworm (minbase + python3) into $rootfs" >&2
    # DEBIAN_MIRROR: a Debian mirror to use instead of debootstrap's default.
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" \
        ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} >"$rootfs.log" 2>&1 || {
        tail -20 "$rootfs.log" >&2
        rm -f "$rootfs.log"
        exit 1
    }
    rm -f "$rootfs.log"
    chroot "$rootfs" apt-get clean
    # What a worker never reads: package lists, documentation, translations.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/*
    mkdir -p "$CACHE"
    tar --numeric-owner -C "$rootfs" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
}

started=$(date +%s.%N)
pip_args=()
if [ "$IMAGE_BASE" = local ]; then
    if ! podman image exists "$LOCAL_BASE"; then
        [ -s "$TARBALL" ] || make_base_tarball
        podman import --quiet "$TARBALL" "$LOCAL_BASE" >/dev/null
    fi
    base=$LOCAL_BASE
    # Wheels for the build, made here (the base's Python is 3.11, as the host's must be).
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir build/wheelhouse \
        "hatchling>=1.21" ".$EXTRAS"
    pip_args=(--build-arg "PIP_ARGS=--no-index --find-links /ctx/build/wheelhouse")
else
    base=$IMAGE_BASE
fi

previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
version=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
podman build --quiet --file Containerfile --tag "$IMAGE" \
    --build-arg "BASE=$base" --build-arg "EXTRAS=$EXTRAS" --build-arg "VERSION=$version" \
    "${pip_args[@]}" . >/dev/null
ended=$(date +%s.%N)
# The build stage's images (untagged) and the image this tag named before: nothing uses them.
podman image prune --force --filter label=io.noetl-pgworker.stage=build >/dev/null 2>&1 || true
# The image this tag named before is left untagged by the build: remove it (if unused).
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
awk -v img="$IMAGE" -v t0="$started" -v t1="$ended" -v size="$size" \
    'BEGIN { printf "image.sh: built %s in %.1f s, %.0f MB\n", img, t1 - t0, size / 1e6 }' >&2
