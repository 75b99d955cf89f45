#!/usr/bin/env bash
# Sets up everything LayerDesk's tests need on a fresh Debian-based machine, then runs them.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k templates`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: Qt's offscreen platform needs EGL, fontconfig and xkbcommon; the engine
# tests use real wimlib and NTFS-3G, and hivex's hivexml/hivexsh to check the registry hives we write;
# the disk tests use qemu-img, sgdisk, sfdisk/fdisk, mkfs.fat/fsck.fat and mtools (files inside an ESP),
# and mkfs.ext4 (e2fsprogs) and mkfs.xfs (xfsprogs) for small real file systems that move file blocks;
# the directory tests run a Samba AD DC (samba-tool provisions it: the AD schema, DSDB and VFS modules
# are only recommended by samba; winbind is not pulled in, and samba dies at start without it); the libvirt
# connector builds libvirt-python (libvirt-dev, pkg-config, gcc, python3-dev) and its tests run a real
# qemu:///session libvirtd (libvirt-daemon, qemu-system-x86, ovmf for UEFI VMs; sasl2-bin and
# libsasl2-modules for one that asks for a password); the packaging tests
# compile the Windows installer with makensis and list it with 7-Zip; the Citrix Provisioning transfer tests
# download with curl and wget (interrupted and resumed); the vSphere connector tests build govmomi's vCenter
# simulator from Debian's govmomi sources with Go (golang-go, golang-github-vmware-govmomi-dev).
bash packaging/ensure-debian-packages.sh libegl1 libgl1 libfontconfig1 libxkbcommon0 libdbus-1-3 fonts-dejavu-core \
    libwim15 wimtools ntfs-3g libhivex-bin qemu-utils gdisk fdisk dosfstools mtools e2fsprogs xfsprogs \
    samba samba-ad-provision samba-dsdb-modules samba-vfs-modules winbind openssl \
    libvirt-dev pkg-config gcc python3-dev libvirt-daemon qemu-system-x86 ovmf sasl2-bin libsasl2-modules \
    nsis p7zip-full curl wget \
    golang-go golang-github-vmware-govmomi-dev

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
export QT_QPA_PLATFORM=offscreen
# One worker per core (at most 4; LAYERDESK_TEST_WORKERS=0 runs in this process), each test file in one
# worker so its module fixtures are made once (modules that need the Samba DC take turns: one per host).
# A worker that crashes ends the run with its test named, rather than being replaced (a replaced worker
# can leave the run waiting forever).
exec .venv/bin/python -m pytest -n "${LAYERDESK_TEST_WORKERS:-auto}" --maxprocesses=4 --dist loadfile \
    --max-worker-restart=0 "$@"
