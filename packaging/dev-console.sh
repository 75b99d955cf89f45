#!/usr/bin/env bash
# Sets up LayerDesk from this source tree on a Debian-based machine and starts the console on the
# embedded default (SQLite catalog + local repository under your data folder).
# Arguments go to the console, e.g. `bash packaging/dev-console.sh --home /srv/layerdesk`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Qt's X11 platform plugin needs these on a minimal Debian.
bash packaging/ensure-debian-packages.sh libegl1 libgl1 libfontconfig1 libxkbcommon0 libxkbcommon-x11-0 \
    libdbus-1-3 fonts-dejavu-core libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 \
    libxcb-render-util0 libxcb-shape0 libxcb-xkb1
# The engine's tools: import, merge and publish need wimlib and NTFS-3G, disk images qemu-img, new disks
# mkfs.fat (System → About shows which ones were found).
bash packaging/ensure-debian-packages.sh libwim15 ntfs-3g qemu-utils dosfstools

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[gui]'
exec .venv/bin/layerdesk "$@"
