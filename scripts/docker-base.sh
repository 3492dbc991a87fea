#!/usr/bin/env bash
# A local base image for the Dockerfile, for machines that reach Debian's package mirror but no image
# registry (CI here): Debian bookworm with python3, made by debootstrap and `docker import`ed.
#
#   bash scripts/docker-base.sh            # prints the image's tag, e.g. local/bookworm-python:3f2a9c0d1e2b
#   docker build --build-arg BASE="$(bash scripts/docker-base.sh)" -t s3fsimg .
#
# Needs root, debootstrap and a running Docker engine. The tag is a hash of this script and of the
# host's CA bundle (copied into the image: TLS to the package registries from a container needs the
# same trust as the host's). Built once: the root filesystem is kept as a tarball under
# $S3FSIMG_BASE_CACHE (default /var/cache/s3fsimg-docker), so a second machine state without the image
# (an engine whose data was wiped) only imports it again (seconds), and the image stays in the engine.
# The mirror is the host's (/etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list), else
# deb.debian.org. Progress goes to stderr; stdout is the tag only.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[docker-base] %s\n' "$*" >&2; }
CACHE=${S3FSIMG_BASE_CACHE:-/var/cache/s3fsimg-docker}
CA=/etc/ssl/certs/ca-certificates.crt
PACKAGES=python3,python3-venv,ca-certificates
key=$( { cat "$0"; [ -f "$CA" ] && cat "$CA"; } | sha256sum | cut -c1-12)
tag=local/bookworm-python:$key
tarball=$CACHE/bookworm-python-$key.tar

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"
    exit 0
fi

mirror() {
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ {print ($2 ~ /^\[/ ? $3 : $2); exit}' /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { say "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
    [ "$(id -u)" = 0 ] || { say "debootstrap needs root"; exit 1; }
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs" "$tarball.tmp"' EXIT
    url=$(mirror)
    say "debootstrap bookworm ($PACKAGES) from $url into $rootfs (about a minute)"
    debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$url" >"$rootfs.log" 2>&1 || {
        tail -20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    [ -f "$CA" ] && cp "$CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"
    # what the official slim images also leave out: package lists, apt's caches, docs and man pages
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    tar -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    find "$CACHE" -maxdepth 1 -name 'bookworm-python-*.tar' ! -name "${tarball##*/}" -delete  # older versions
    rm -rf "$rootfs"
    trap - EXIT
fi
say "docker import $tarball as $tag"
docker import --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["/bin/bash"]' "$tarball" "$tag" >/dev/null
echo "$tag"
