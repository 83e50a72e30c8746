#!/usr/bin/env bash
# Build the service image without a Docker engine or a registry, then run it and check it serves.
#
#   scripts/build_image.sh [--repository DIR | --tiny] [--find-links DIR] [--work DIR] [--tag NAME] [--fresh] [--clean]
#
# 1. base: a Debian bookworm rootfs made by debootstrap (with python3 + python3-venv, what the
#    Dockerfile asks of its BASE_IMAGE), imported as an image with `buildah from scratch` + `add`;
# 2. wheels: the locked dependencies (deploy/docker/requirements.txt) downloaded once on this host
#    and hash-checked, then offered to the build offline through a read-only volume and a pip.conf;
# 3. build: `buildah bud --isolation chroot --storage-driver vfs --build-arg BASE_IMAGE=<base>` on
#    the real Dockerfile and .dockerignore;
# 4. run: the image's own CMD in a container (`buildah run`, host network, loopback only, CPU),
#    serving --repository mounted at /models (default: the image's embedded repository when it
#    holds a bundle, else, or with --tiny, a tiny bundle written by scripts/make_tiny_bundle.py);
#    checks the user is not root, /v2/health/ready, the image's HEALTHCHECK command, and /predict
#    (with the tiny bundle: one image accepted and one rejected, as its thresholds dictate).
#
# Needs root, buildah, debootstrap, curl and a CPython 3.11 (PYTHON, default .venv/bin/python) with
# the project installed. --find-links names a local directory of wheels to prefer over PyPI (a
# mirror). Slow: the CUDA torch wheels are ~3 GB and vfs copies every layer, so expect ~10 minutes
# and ~20 GB of disk under --work on 2 cores (benchmarks/RESULTS.md). State is kept under --work
# between runs (base image, wheels); --fresh starts over, --clean deletes it all at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

WORK=${MIXOE_BUILD_DIR:-/var/tmp/mixoe-image-build}
TAG=localhost/mixoe-service:dev
BASE_TAG=localhost/mixoe-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
REPOSITORY=""
FIND_LINKS=""
FRESH=0
CLEAN=0
FORCE_TINY=0
READY_TIMEOUT_S=300

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --repository) REPOSITORY=$(realpath "$2"); shift 2 ;;
        --find-links) FIND_LINKS=$(realpath "$2"); shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --tiny) FORCE_TINY=1; shift ;;
        --fresh) FRESH=1; shift ;;
        --clean) CLEAN=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown option $1" >&2; usage 2 >&2 ;;
    esac
done

fail() { echo "build_image.sh: FAIL: $*" >&2; exit 1; }
for tool in buildah debootstrap curl; do
    command -v "$tool" >/dev/null || fail "$tool not found (apt-get install -y buildah debootstrap curl)"
done
[ "$(id -u)" = 0 ] || fail "run as root (debootstrap and buildah's chroot isolation need it)"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
    || fail "PYTHON=$PYTHON must be CPython 3.11 (the lock file is for cp311)"

START=$SECONDS
declare -a TIMINGS=()
phase() { TIMINGS+=("$1: $(( SECONDS - PHASE_START ))s"); echo "== $1 done in $(( SECONDS - PHASE_START ))s"; }

mkdir -p "$WORK"
WORK=$(realpath "$WORK")
B=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
if [ "$FRESH" = 1 ]; then  # let buildah unmount and delete what it made, then remove the rest
    "${B[@]}" rm --all >/dev/null 2>&1 || true
    "${B[@]}" rmi --all --force >/dev/null 2>&1 || true
    rm -rf "$WORK"
    mkdir -p "$WORK"
fi

# -- 1. base image from debootstrap --------------------------------------------------------------
PHASE_START=$SECONDS
if "${B[@]}" inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
    echo "== base image $BASE_TAG already built (use --fresh to rebuild)"
else
    rm -rf "$WORK/rootfs"
    echo "== debootstrap bookworm into $WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed (log: $WORK/debootstrap.log)"; }
    rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$WORK/rootfs" -cf "$WORK/rootfs.tar" .
    container=$("${B[@]}" from scratch)
    "${B[@]}" add "$container" "$WORK/rootfs.tar" / >/dev/null
    "${B[@]}" config --env LANG=C.UTF-8 \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd '["/bin/bash"]' "$container"
    "${B[@]}" commit -q "$container" "$BASE_TAG" >/dev/null
    "${B[@]}" rm "$container" >/dev/null
    rm -rf "$WORK/rootfs" "$WORK/rootfs.tar"
fi
phase "base image (debootstrap + import)"

# -- 2. wheels for an offline build --------------------------------------------------------------
PHASE_START=$SECONDS
mkdir -p "$WORK/wheelhouse"
download=("$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes
          --only-binary=:all: -r deploy/docker/requirements.txt -d "$WORK/wheelhouse")
[ -n "$FIND_LINKS" ] && download+=(--find-links "$FIND_LINKS")
"${download[@]}" >"$WORK/wheels.log" 2>&1 || { tail -20 "$WORK/wheels.log" >&2; fail "pip download failed (log: $WORK/wheels.log)"; }
printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' >"$WORK/pip.conf"
phase "wheels ($(du -sh "$WORK/wheelhouse" | cut -f1))"

# -- 3. build ------------------------------------------------------------------------------------
PHASE_START=$SECONDS
# --format docker keeps the HEALTHCHECK (the OCI image format has no field for it).
"${B[@]}" rmi "$TAG" >/dev/null 2>&1 || true  # a rebuild replaces the image instead of piling up copies
rm -f "$WORK/build.status"
{
    rc=0
    "${B[@]}" bud --isolation chroot --format docker --layers=false \
        --build-arg "BASE_IMAGE=$BASE_TAG" \
        --volume "$WORK/wheelhouse:/wheelhouse:ro" --volume "$WORK/pip.conf:/etc/pip.conf:ro" \
        --tag "$TAG" --file Dockerfile . 2>&1 || rc=$?
    echo "$rc" >"$WORK/build.status"
} | tee "$WORK/build.log" | grep --line-buffered -E 'STEP|COMMIT' || true
[ "$(cat "$WORK/build.status" 2>/dev/null)" = 0 ] || { tail -30 "$WORK/build.log" >&2; fail "buildah bud failed (log: $WORK/build.log)"; }
IMAGE_SIZE=$("${B[@]}" images --format '{{.Size}}' "$TAG")
phase "buildah bud (image $IMAGE_SIZE)"

# -- 4. run the image ----------------------------------------------------------------------------
PHASE_START=$SECONDS
IMAGES=$WORK/smoke-images
rm -rf "$IMAGES"
container=$("${B[@]}" from "$TAG")
cleanup() {
    [ -n "${SERVER_PID:-}" ] && kill -TERM "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    "${B[@]}" rm "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT
run=("${B[@]}" run --isolation chroot -e MIXOE_HOST=127.0.0.1 -e MIXOE_DEVICE=cpu)
TINY=0
if [ -n "$REPOSITORY" ]; then
    SERVING="$REPOSITORY (mounted at /models)"
elif [ "$FORCE_TINY" = 0 ] && "${run[@]}" "$container" -- python -c \
        'import glob, sys; sys.exit(not glob.glob("/app/models/repository/*/*/manifest.json"))'; then
    SERVING="the image's embedded repository"
else
    echo "== serving a tiny generated bundle (--tiny, or the image embeds none)"
    rm -rf "$WORK/tiny-repository"
    "$PYTHON" scripts/make_tiny_bundle.py "$WORK/tiny-repository" --images "$IMAGES"
    REPOSITORY=$WORK/tiny-repository
    SERVING="a tiny bundle (mounted at /models)"
    TINY=1
fi
if [ -n "$REPOSITORY" ]; then
    chmod -R a+rX "$REPOSITORY"  # the container runs as uid 10001
    run+=(-e MIXOE_MODEL_REPOSITORY=/models -v "$REPOSITORY:/models:ro")
fi
if [ "$TINY" = 0 ]; then  # whether a real model accepts it is unknown: only the answer's shape is checked
    mkdir -p "$IMAGES"
    "$PYTHON" -c 'import sys; from PIL import Image; Image.new("RGB", (64, 48), (90, 140, 60)).save(sys.argv[1])' \
        "$IMAGES/sample.png"
fi

PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run+=(-e "MIXOE_PORT=$PORT" "$container" --)
IMAGE_JSON=$("${B[@]}" inspect --type image "$TAG")
mapfile -t CMD < <(echo "$IMAGE_JSON" | "$PYTHON" -c 'import json, sys; print(*json.load(sys.stdin)["Docker"]["config"]["Cmd"], sep="\n")')
mapfile -t HEALTH < <(echo "$IMAGE_JSON" | "$PYTHON" -c '
import json, sys
test = json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"]
assert test[0] == "CMD", test
print(*test[1:], sep="\n")')

USER_ID=$("${run[@]}" id -u)
[ "$USER_ID" != 0 ] || fail "the image runs as root"
echo "== container user id: $USER_ID"

echo "== starting: ${CMD[*]} on 127.0.0.1:$PORT, serving $SERVING"
SERVE_START=$SECONDS
"${run[@]}" "${CMD[@]}" >"$WORK/service.log" 2>&1 &
SERVER_PID=$!
until curl -fsS "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null 2>&1; do
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -30 "$WORK/service.log" >&2; fail "the service exited before it was ready"; }
    [ $(( SECONDS - SERVE_START )) -lt "$READY_TIMEOUT_S" ] || fail "not ready after ${READY_TIMEOUT_S}s"
    sleep 1
done
READY_S=$(( SECONDS - SERVE_START ))
echo "== /v2/health/ready: 200 after ${READY_S}s"

"${run[@]}" "${HEALTH[@]}" || fail "the image's HEALTHCHECK command failed against a ready service"
echo "== HEALTHCHECK command: exit 0"

predict() {  # $1: image; prints the "accepted" flag of the one prediction
    curl -fsS -F "files=@$1;type=image/png" "http://127.0.0.1:$PORT/predict" | "$PYTHON" -c '
import json, sys
body = json.load(sys.stdin)
def find(node):
    if isinstance(node, dict):
        if isinstance(node.get("accepted"), bool):
            return node["accepted"]
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            found = find(child)
            if found is not None:
                return found
found = find(body)
assert found is not None, f"no accepted flag in {body}"
print(str(found).lower())'
}
if [ "$TINY" = 1 ]; then
    ACCEPTED=$(predict "$IMAGES/accept.png") || fail "/predict failed"
    echo "== /predict accept.png: accepted=$ACCEPTED"
    [ "$ACCEPTED" = true ] || fail "accept.png was rejected"
    REJECTED=$(predict "$IMAGES/reject.png") || fail "/predict failed"
    echo "== /predict reject.png: accepted=$REJECTED"
    [ "$REJECTED" = false ] || fail "reject.png was accepted"
else
    ACCEPTED=$(predict "$IMAGES/sample.png") || fail "/predict failed"
    echo "== /predict sample.png: 200, accepted=$ACCEPTED"
fi
curl -fsS "http://127.0.0.1:$PORT/metrics" | grep -q '^mixoe_predictions_total{' || fail "/metrics has no mixoe_predictions_total"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""
phase "run from the image (ready after ${READY_S}s)"

echo
echo "PASS: $TAG ($IMAGE_SIZE) built from Dockerfile on $BASE_TAG; served $SERVING: /v2/health/ready, HEALTHCHECK, /predict"
printf '  %s\n' "${TIMINGS[@]}"
echo "  total: $(( SECONDS - START ))s on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
if [ "$CLEAN" = 1 ]; then
    trap - EXIT
    cleanup
    rm -rf "$WORK"
fi
