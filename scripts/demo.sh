#!/usr/bin/env bash
# The main job: start a device server with every device type it has, then
# boot a Linux guest under QEMU whose PCI devices are all served by it
# (through the vfio-user bridge). The guest (scripts/demo-guest.sh) lists
# them, writes and reads its disk, talks on its console's two ports and draws
# on its framebuffer; the host side (python -m vmm_client.demo) holds the
# console's host ends, saves a screendump and prints what each end got.
#
# DEMO_SCREENDUMP=PATH (.png or .ppm) says where the picture goes.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== set-up (idempotent: the virtualenv, QEMU and the guest image, cached)"
bash scripts/setup.sh

run=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"' EXIT
chmod 700 "$run"
sock="unix:$run/devserver.sock"
screen=${DEMO_SCREENDUMP:-${XDG_CACHE_HOME:-$HOME/.cache}/devmodel/demo-screen.png}
mkdir -p "$(dirname "$screen")"
truncate -s 64M "$run/disk.img"   # a fresh raw disk image for the guest's virtio-blk

echo "== starting the device server"
.venv/bin/python -m devserver --listen "$sock" --log-level warning \
    --device pci-testdev --device pci-testdev,slot=4,name=second \
    --device "virtio-blk,path=$run/disk.img,serial=demo-disk" \
    --device "virtio-console,chardev=socket:$run/hvc0.sock,port=org.devmodel.agent:socket:$run/agent.sock" \
    --device vesa-fb &
server=$!
for _ in $(seq 300); do
    [ -S "$run/devserver.sock" ] && break
    kill -0 "$server" 2>/dev/null || { echo "demo: FAILED: the device server did not start" >&2; exit 1; }
    sleep 0.1
done
[ -S "$run/devserver.sock" ] || { echo "demo: FAILED: the device server did not listen within 30 s" >&2; exit 1; }

.venv/bin/python -m vmm_client.demo --devserver "$sock" --script scripts/demo-guest.sh \
    --hvc0 "$run/hvc0.sock" --agent "$run/agent.sock" --screendump "$screen"
