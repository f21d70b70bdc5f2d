#!/usr/bin/env bash
# The main job: start a device server with every device type it has, then
# boot a Linux guest under QEMU whose PCI devices are all served by it
# (through the vfio-user bridge). The guest (scripts/demo-guest.sh) lists
# them, writes and reads its disk, talks on its console's two ports and draws
# on its framebuffer; the host side (python -m vmm_client.demo) holds the
# console's host ends, saves a screendump and prints what each end got.
#
# As root, a virtio-net too: the server makes its tap, which goes into a
# network namespace of its own (devmodel-demo-PID) at 10.0.78.1/24, so the
# guest's ping (from 10.0.78.2) never touches the machine's own network.
# Where the server has them: a virtio-scsi disk (a second small raw image), a
# virtio-9p export (a directory with a file the guest reads and one it writes
# back, printed here) and a virtio-balloon (the host side sets its target).
#
# DEMO_SCREENDUMP=PATH (.png or .ppm) says where the picture goes.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== set-up (idempotent: the virtualenv, QEMU and the guest image, cached)"
bash scripts/setup.sh

run=$(mktemp -d)
server= netns=
cleanup() {
    [ -z "$server" ] || kill "$server" 2>/dev/null || true
    wait 2>/dev/null || true
    # The tap goes with the server's fd; the namespace with its name.
    [ -z "$netns" ] || ip netns del "$netns" 2>/dev/null || true
    rm -rf "$run"
}
trap cleanup EXIT
chmod 700 "$run"
sock="unix:$run/devserver.sock"
screen=${DEMO_SCREENDUMP:-${XDG_CACHE_HOME:-$HOME/.cache}/devmodel/demo-screen.png}
mkdir -p "$(dirname "$screen")"
truncate -s 64M "$run/disk.img"   # a fresh raw disk image for the guest's virtio-blk

# The device types that need something of the host beyond a file: each either
# joins `extra` or says why it is skipped, and the demo goes on without it.
extra=()
types=$(.venv/bin/python -m devserver --help)
has() { grep -qE "^  $1( |\$)" <<<"$types"; }
if has virtio-scsi; then
    truncate -s 16M "$run/scsi.img"
    extra+=(--device "virtio-scsi,disk=$run/scsi.img")
else
    echo "virtio-scsi: skipped (this server has no such device type)"
fi
share=
if has virtio-9p; then
    share=$run/share
    mkdir "$share"
    echo "hello from the host, through virtio-9p" > "$share/hello.txt"
    extra+=(--device "virtio-9p,path=$share,tag=demo-share")
else
    echo "virtio-9p: skipped (this server has no such device type)"
fi
if has virtio-balloon; then
    extra+=(--device virtio-balloon)
else
    echo "virtio-balloon: skipped (this server has no such device type)"
fi
tap= net_host=10.0.78.1
if [ "$(id -u)" != 0 ]; then
    echo "virtio-net: skipped (needs root for a tap)"
elif [ ! -c /dev/net/tun ]; then
    echo "virtio-net: skipped (no /dev/net/tun: modprobe tun)"
elif ! command -v ip >/dev/null; then
    echo "virtio-net: skipped (needs iproute2's ip for the network namespace)"
else
    tap=dmdemo$$                  # at most 15 characters: an interface name
    netns=devmodel-demo-$$
    extra+=(--device "virtio-net,tap=$tap")
fi

echo "== starting the device server"
.venv/bin/python -m devserver --listen "$sock" --log-level warning \
    --device pci-testdev --device pci-testdev,slot=4,name=second \
    --device "virtio-blk,path=$run/disk.img,serial=demo-disk" \
    --device "virtio-console,chardev=socket:$run/hvc0.sock,port=org.devmodel.agent:socket:$run/agent.sock" \
    --device vesa-fb "${extra[@]}" &
server=$!
for _ in $(seq 300); do
    [ -S "$run/devserver.sock" ] && break
    kill -0 "$server" 2>/dev/null || { echo "demo: FAILED: the device server did not start" >&2; exit 1; }
    sleep 0.1
done
[ -S "$run/devserver.sock" ] || { echo "demo: FAILED: the device server did not listen within 30 s" >&2; exit 1; }

if [ -n "$tap" ]; then
    # The server made the tap (TUNSETIFF) before it listened: move it into the
    # namespace and give it the guest's peer address there.
    echo "== virtio-net: tap $tap into network namespace $netns at $net_host/24"
    { ip netns add "$netns" && ip link set dev "$tap" netns "$netns" &&
        ip -n "$netns" addr add "$net_host/24" dev "$tap" &&
        ip -n "$netns" link set dev "$tap" up; } ||
        { echo "demo: FAILED: could not put the tap $tap into $netns (see ip's message)" >&2; exit 1; }
fi

status=0
.venv/bin/python -m vmm_client.demo --devserver "$sock" --script scripts/demo-guest.sh \
    --hvc0 "$run/hvc0.sock" --agent "$run/agent.sock" --screendump "$screen" || status=$?

if [ -n "$tap" ]; then
    # Read while the server still holds the tap (it goes away with the fd).
    count() { ip netns exec "$netns" cat "/sys/class/net/$tap/statistics/$1" 2>/dev/null || echo '?'; }
    echo "== virtio-net: the tap's end in $netns ($net_host) got $(count rx_packets) packets" \
        "from the guest and sent it $(count tx_packets)"
fi
if [ -n "$share" ]; then
    if [ -f "$share/from-guest.txt" ]; then
        echo "== virtio-9p: the guest wrote $share/from-guest.txt: $(cat "$share/from-guest.txt")"
    else
        echo "demo: FAILED: the guest wrote no from-guest.txt into the 9p export" >&2
        status=1
    fi
fi
exit $status
