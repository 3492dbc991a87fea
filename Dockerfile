# The s3fsimg image: the `s3fsimg` program (CLI, Python API, FUSE mount) and nothing else (no dataset).
#
#   docker build -t s3fsimg .
#   docker run --rm --network host --env-file demo.env -v s3fsimg-cache:/var/cache/s3fsimg s3fsimg fetch ID
#   docker run -d --name ds --init --network host --env-file demo.env --user root \
#       --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor=unconfined \
#       s3fsimg mount --foreground /mnt/images
#
# Commands that need no mount run as the unprivileged user `s3fsimg` (uid 1000); a mount needs
# /dev/fuse, CAP_SYS_ADMIN and (where /dev/fuse is 0600 root, as on most hosts) root in the container.
# The README's "Containers" section has both compose patterns and what AppArmor needs.
#
# BASE: any Debian bookworm image with python3 (>= 3.10) and venv; the default is the official slim
# image. Where no registry is reachable, scripts/docker-base.sh makes one with debootstrap:
#   docker build --build-arg BASE="$(bash scripts/docker-base.sh)" -t s3fsimg .
ARG BASE=python:3.11-slim-bookworm

# -- build: a venv with the locked dependencies (verified by hash) and the project's wheel ------------
FROM ${BASE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# pyfuse3 compiles against libfuse3 and Python's headers (the slim images have the headers; Debian's
# python3 needs libpython3-dev). None of this reaches the final image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libfuse3-dev pkg-config \
 && if ! python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then \
        apt-get install -y --no-install-recommends libpython3-dev; fi \
 && rm -rf /var/lib/apt/lists/*
COPY requirements/runtime.lock requirements/dev.lock /tmp/req/
RUN python3 -m venv /opt/s3fsimg \
 && /opt/s3fsimg/bin/pip install --require-hashes -r /tmp/req/runtime.lock
# The build backend, pinned with its hash in the dev lock, in a venv of its own that is not copied.
RUN python3 -m venv /opt/build \
 && awk '/^setuptools==/ {p = 1} p {print} p && !/\\$/ {exit}' /tmp/req/dev.lock > /tmp/req/build.lock \
 && /opt/build/bin/pip install --require-hashes -r /tmp/req/build.lock
COPY pyproject.toml README.md /src/
COPY s3fsimg/ /src/s3fsimg/
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation -w /tmp/wheel /src \
 && /opt/s3fsimg/bin/pip install --no-deps /tmp/wheel/s3fsimg-*.whl \
 && /opt/s3fsimg/bin/pip uninstall -y -q pip setuptools \
 && find /opt/s3fsimg -name __pycache__ -prune -exec rm -rf {} + \
 && /opt/s3fsimg/bin/python -m compileall -q /opt/s3fsimg/lib

# -- the image ---------------------------------------------------------------------------------------
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
# fuse3: fusermount3 (unmounting, non-root mounts) and libfuse3, which pyfuse3 links against.
# user_allow_other: a non-root mount in the container may pass --allow-other.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && sed -i 's/^#\s*user_allow_other/user_allow_other/' /etc/fuse.conf \
 && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin s3fsimg \
 && mkdir -p /var/cache/s3fsimg /mnt/images \
 && chown s3fsimg:s3fsimg /var/cache/s3fsimg /mnt/images
COPY --from=build /opt/s3fsimg /opt/s3fsimg
ENV PATH=/opt/s3fsimg/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATASET_CACHE_DIR=/var/cache/s3fsimg
USER s3fsimg
WORKDIR /home/s3fsimg
ENTRYPOINT ["s3fsimg"]
CMD ["--help"]
