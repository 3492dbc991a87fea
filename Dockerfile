# The s3fsimg client image: the CLI, the Python API and the FUSE mount.
#   docker build -t s3fsimg .
#   docker run --rm --device /dev/fuse --cap-add SYS_ADMIN --env-file .env s3fsimg mount --foreground /mnt/images
# Mounting needs /dev/fuse and CAP_SYS_ADMIN (or --privileged); fetch/validate/upload need neither.
# Dependencies come from requirements/runtime.lock: exact versions, verified by hash.

FROM python:3.11-slim-bookworm
COPY requirements/runtime.lock /tmp/runtime.lock
# pyfuse3 is built from source against libfuse3; the compiler is removed again in the same layer.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 gcc libc6-dev libfuse3-dev pkg-config \
 && pip install --no-cache-dir --require-hashes -r /tmp/runtime.lock \
 && apt-get purge -y gcc libc6-dev libfuse3-dev pkg-config \
 && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* /tmp/runtime.lock \
 && useradd --create-home --uid 1000 s3fsimg
WORKDIR /app
COPY s3fsimg/ /app/s3fsimg/
ENV PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    DATASET_CACHE_DIR=/var/cache/s3fsimg
RUN mkdir -p /var/cache/s3fsimg && chown s3fsimg /var/cache/s3fsimg
ENTRYPOINT ["python", "-m", "s3fsimg"]
CMD ["--help"]
