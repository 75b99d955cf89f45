#!/usr/bin/env bash
# Builds the one-folder frozen LayerDesk (layerdesk + layerctl) with PyInstaller.
# Usage: bash packaging/build-frozen.sh [DIST_DIR] [WORK_DIR]   (defaults: build/dist, build/work)
# Needs the project installed with its "build" extra: pip install -e '.[gui,build]'.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dist="${1:-$root/build/dist}"
work="${2:-$root/build/work}"
python="${PYTHON:-python3}"
mkdir -p "$dist" "$work"
started=$(date +%s)
"$python" -m PyInstaller --noconfirm --clean --log-level WARN \
    --distpath "$dist" --workpath "$work" "$root/packaging/layerdesk.spec"
echo "built $dist/LayerDesk in $(( $(date +%s) - started )) s ($(du -sh "$dist/LayerDesk" | cut -f1))"
