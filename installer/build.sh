#!/usr/bin/env bash
# Compiles the Windows installer around a PyInstaller one-folder build with makensis (which runs on
# Linux too). Usage: [NSIS_COMPRESSOR=zlib|none] bash installer/build.sh APPDIR OUTFILE [TOOLSDIR]
#   APPDIR   the one-folder build (packaging/build-frozen.sh makes DIST/LayerDesk)
#   OUTFILE  the installer to write
#   TOOLSDIR optional folder of Windows engine tools (qemu-img, libwim-15.dll) to ship in it
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
appdir="$(cd "$1" && pwd)"
outfile="$2"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/../pyproject.toml" | head -n 1)"
defines=(-DVERSION="$version" -DAPPDIR="$appdir" -DOUTFILE="$(realpath -m "$outfile")")
if [ $# -ge 3 ] && [ -n "$3" ]; then defines+=(-DTOOLSDIR="$(cd "$3" && pwd)"); fi
if [ -n "${NSIS_COMPRESSOR:-}" ]; then defines+=(-DCOMPRESSOR="$NSIS_COMPRESSOR"); fi
started=$(date +%s)
makensis -V2 -NOCD "${defines[@]}" "$here/layerdesk.nsi"
echo "built $outfile in $(( $(date +%s) - started )) s ($(du -h "$outfile" | cut -f1))"
