#!/usr/bin/env bash
# Re-pin every dependency with hashes. The lock files record no package index address
# (uv.lock would, so it is not used and stays ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml --generate-hashes --universal --python-version 3.10 -q -o requirements/runtime.lock
uv pip compile pyproject.toml --extra dev --extra bench --generate-hashes --universal --python-version 3.10 -q \
    -o requirements/dev.lock
if grep -nE 'https?://|--index-url|--extra-index-url|--find-links' requirements/*.lock; then
    echo "lock files must not record an index address" >&2
    exit 1
fi
