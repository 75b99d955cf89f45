#!/usr/bin/env bash
# Sets up LayerDesk from this source tree on a Debian-based machine and starts the console on the
# embedded default (SQLite catalog + local repository under your data folder).
# Arguments go to the console, e.g. `bash packaging/dev-console.sh --home /srv/layerdesk`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Qt's X11 platform plugin needs these on a minimal Debian.
packages=(libegl1 libgl1 libfontconfig1 libxkbcommon0 libxkbcommon-x11-0 libdbus-1-3 fonts-dejavu-core
          libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-shape0 libxcb-xkb1)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        sudo apt-get install -y --no-install-recommends "${missing[@]}"
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[gui]'
exec .venv/bin/layerdesk "$@"
