#!/usr/bin/env bash
# Creates bench/.peers/venv with the peers pinned in bench/peers/requirements.txt.
# Idempotent: when the venv was built from these exact pins, it does nothing.
# Usage: bash bench/peers/setup.sh   (from anywhere; needs python3 >= 3.11 and PyPI)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$(cd "$here/.." && pwd)/.peers/venv"
pins="$here/requirements.txt"
stamp="$venv/.bench-pins"

if [[ -x "$venv/bin/python" && -f "$stamp" ]] && cmp -s "$pins" "$stamp"; then
    echo "peers venv already set up: $venv"
    exit 0
fi

python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-deps --require-virtualenv -r "$pins"
"$venv/bin/python" -m pip check
cp "$pins" "$stamp"
echo "peers venv ready: $venv"
"$venv/bin/python" -m pip freeze
