#!/usr/bin/env bash
# The main job: start a device server with its devices, and drive it from a
# frontend that enumerates, sizes, assigns and moves BARs like a guest kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

run=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"' EXIT
chmod 700 "$run"
sock="unix:$run/devserver.sock"
.venv/bin/python -m devserver --listen "$sock" --log-level warning \
    --device pci-testdev --device pci-testdev,slot=4,name=second &
server=$!
for _ in $(seq 100); do [ -S "$run/devserver.sock" ] && break; sleep 0.1; done
.venv/bin/python -m vmm_client probe --devserver "$sock" --move
