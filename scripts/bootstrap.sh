#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine that has only python3, pip, git and root:
# installs what is missing (saying what), builds .venv from the hashed lock file, then runs
# `just <args>`.   bash scripts/bootstrap.sh demo   |   bash scripts/bootstrap.sh test
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
JUST_VERSION=1.59.0
say() { printf '[bootstrap] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# System packages: FUSE 3 (runtime and headers for pyfuse3), a C compiler and Python headers to build it.
missing=()
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ! pkg-config --exists fuse3 2>/dev/null; then missing+=(libfuse3-dev); fi
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
if ! python3 -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    missing+=(python3-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing with apt-get: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Tools: uv (environments) and just (recipes), from PyPI through pip.
tools=()
command -v uv >/dev/null 2>&1 || tools+=("uv==${UV_VERSION}")
command -v just >/dev/null 2>&1 || tools+=("rust-just==${JUST_VERSION}")
if [ ${#tools[@]} -gt 0 ]; then
    say "installing with pip: ${tools[*]}"
    # Debian's python3 marks itself externally managed; these two are self-contained binaries.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check "${tools[@]}"
    hash -r
fi
for dir in "$HOME/.local/bin" /usr/local/bin; do
    case ":$PATH:" in *":$dir:"*) ;; *) PATH="$dir:$PATH" ;; esac
done
export PATH

# The project environment, from the hashed lock (rebuilt when the lock or a pyproject.toml changes).
stamp=.venv/.lock-sha256
want=$(sha256sum requirements/dev.lock pyproject.toml lab/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "creating .venv from requirements/dev.lock"
    [ -x .venv/bin/python ] || uv venv --quiet --python python3 .venv
    uv pip install --quiet --python .venv/bin/python --require-hashes -r requirements/dev.lock
    uv pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e .
    # the test lab (moto server, fault proxy, images), a dev package that tests, bench and scripts import
    uv pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e lab
    echo "$want" > "$stamp"
fi

if [ $# -gt 0 ]; then
    exec just "$@"
fi
