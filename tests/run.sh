#!/usr/bin/env bash
# Sets up everything LayerDesk's tests need on a fresh Debian-based machine, then runs them.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k templates`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use (Qt's offscreen platform needs EGL, fontconfig, xkbcommon).
packages=(libegl1 libgl1 libfontconfig1 libxkbcommon0 libdbus-1-3 fonts-dejavu-core)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "Missing Debian packages: ${missing[*]} — run: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
export QT_QPA_PLATFORM=offscreen
exec .venv/bin/python -m pytest "$@"
