#!/usr/bin/env bash
# The main job: start a device server with its devices, then boot a Linux
# guest under QEMU whose PCI devices are all served by it (through the
# vfio-user bridge), and print what the guest sees of them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

run=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"' EXIT
chmod 700 "$run"
sock="unix:$run/devserver.sock"
truncate -s 64M "$run/disk.img"   # a raw disk image for the guest's virtio-blk
.venv/bin/python -m devserver --listen "$sock" --log-level warning \
    --device pci-testdev --device pci-testdev,slot=4,name=second \
    --device "virtio-blk,path=$run/disk.img,serial=demo-disk" &
server=$!
for _ in $(seq 100); do [ -S "$run/devserver.sock" ] && break; sleep 0.1; done
.venv/bin/python -m vmm_client qemu --devserver "$sock"
