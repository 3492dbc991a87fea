# Recipes. On a fresh machine start with `bash scripts/bootstrap.sh <recipe>`, which installs
# what is missing and then runs the recipe.
set dotenv-load := false
set positional-arguments := true

py := ".venv/bin/python"

# list the recipes
default:
    @just --list

# install system packages, uv, just and .venv (from the hashed lock)
setup:
    bash scripts/bootstrap.sh

# lint, type-check and run the whole test suite (real FUSE mounts, local S3 server)
test *args: setup
    {{py}} -m ruff check s3fsimg tests bench scripts lab examples
    {{py}} -m mypy
    {{py}} -m pytest -q "$@"

# ruff and mypy only
lint: setup
    {{py}} -m ruff check s3fsimg tests bench scripts lab examples
    {{py}} -m mypy

# the whole story on a local S3 server: sample data, upload, validate, fetch, mount, list
demo *args: setup
    {{py}} scripts/demo.py "$@"

# benchmarks against boto3, a local copy, rclone mount and s3fs-fuse (--quick for CI)
bench *args: setup
    {{py}} -m bench "$@"

# the fault soak: a mount and a Dataset under cycling S3 faults, every byte checked (docs/reliability.md)
soak *args: setup
    {{py}} -m tests.soak "$@"

# hash DIR into a manifest (no S3 access)
manifest dir *args: setup
    {{py}} -m s3fsimg manifest "$@"

# upload DIR (configuration from .env / environment)
upload dir *args: setup
    {{py}} -m s3fsimg upload "$@"

# validate a manifest file, or the bucket's
validate *args: setup
    {{py}} -m s3fsimg validate "$@"

# fetch N random images through the cache
random-fetch *args: setup
    {{py}} -m s3fsimg random-fetch "$@"

# mount the dataset read-only
mount mountpoint *args: setup
    {{py}} -m s3fsimg mount "$@"

# re-pin dependencies (hashed, no index address)
lock:
    bash scripts/lock.sh

# fill the cache: ids, mount paths, --from FILE or --all (configuration from .env / environment)
warm *args: setup
    {{py}} -m s3fsimg warm "$@"

# build the container image s3fsimg (BASE: a base image; default the official python slim image)
image base="python:3.11-slim-bookworm":
    docker build --build-arg BASE={{base}} -t s3fsimg .

# build the container image on a local Debian base made with debootstrap (no image registry needed)
image-local:
    docker build --build-arg BASE="$(bash scripts/docker-base.sh)" -t s3fsimg .

# the container tests alone (they start a Docker engine when none runs, and build the image)
test-container *args: setup
    {{py}} -m pytest -q tests/test_container.py "$@"
