# The guest half of the main job (scripts/demo.sh): runs in the Linux guest's
# busybox shell, after /init loaded the drivers. Every device it touches is
# served by the device server. Each step says what it did; a step that fails
# says FAILED and the script goes on, then exits non-zero.
failed=0
fail() { echo "   FAILED: $*"; failed=1; }
wait_for() {  # wait_for PATH [TENTHS]: a device node appears once its driver has probed
    i=0; while [ ! -e "$1" ] && [ $i -lt "${2:-100}" ]; do sleep 0.1; i=$((i+1)); done; test -e "$1"
}
find_dev() {  # find_dev VENDOR DEVICE: the first PCI address with these IDs
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat $d/vendor) $(cat $d/device)" = "$1 $2" ] && { echo "${d##*/}"; return; }
    done
}

echo "== lspci: the served devices sit behind QEMU's pcie-root-ports"
lspci -nn
blk=$(find_dev 0x1af4 0x1042)
echo "== lspci -vv of the virtio-blk ($blk): virtio capabilities, MSI-X, PCIe"
if [ -n "$blk" ]; then
    lspci -vv -nn -s "$blk" 2>/dev/null  # without "Unable to load libkmod resources"
else
    fail "no virtio-blk (1af4:1042) on the bus"
fi

echo "== disk: /dev/vda through Linux's virtio_blk driver"
if wait_for /dev/vda; then
    echo "   $(cat /sys/block/vda/size) sectors, serial $(cat /sys/block/vda/serial)"
    dd if=/dev/urandom of=/tmp/pattern bs=4096 count=64 2>/dev/null
    dd if=/tmp/pattern of=/dev/vda bs=4096 oflag=direct 2>/dev/null
    dd if=/dev/vda of=/tmp/back bs=4096 count=64 iflag=direct 2>/dev/null
    cmp -s /tmp/pattern /tmp/back && echo "   wrote and read back 256 KiB: identical" \
        || fail "what came back differs from what was written"
else
    fail "no /dev/vda"
fi

echo "== SCSI: /dev/sda, a disk on the virtio-scsi, through Linux's virtio_scsi and sd drivers"
scsi=$(find_dev 0x1af4 0x1048)
if [ -z "$scsi" ]; then
    echo "   no virtio-scsi on the bus (this server has none)"
elif wait_for /dev/sda 300; then  # the SCSI scan runs asynchronously
    d=/sys/block/sda/device
    echo "   $(cat /sys/block/sda/size) sectors, $(echo $(cat $d/vendor) $(cat $d/model)) at $(basename $(readlink $d))"
    dd if=/dev/urandom of=/tmp/pattern bs=4096 count=16 2>/dev/null
    dd if=/tmp/pattern of=/dev/sda bs=4096 oflag=direct 2>/dev/null
    dd if=/dev/sda of=/tmp/back bs=4096 count=16 iflag=direct 2>/dev/null
    cmp -s /tmp/pattern /tmp/back && echo "   wrote and read back 64 KiB: identical" \
        || fail "what came back from /dev/sda differs from what was written"
else
    fail "no /dev/sda"
fi

echo "== network: Linux's virtio_net driver, the host's tap at 10.0.78.1 in a network namespace"
net=$(find_dev 0x1af4 0x1041)
if [ -z "$net" ]; then
    echo "   no virtio-net on the bus (the host skipped it, and said why)"
else
    # The interface under this PCI function (eth0: it is the only NIC).
    ifc= i=0
    while [ -z "$ifc" ] && [ $i -lt 100 ]; do
        ifc=$(ls /sys/bus/pci/devices/$net/virtio*/net 2>/dev/null | head -n 1)
        [ -n "$ifc" ] || sleep 0.1
        i=$((i+1))
    done
    if [ -z "$ifc" ]; then
        fail "no network interface under the virtio-net ($net)"
    elif ! { ip link set "$ifc" up && ip addr add 10.0.78.2/24 dev "$ifc"; }; then
        fail "could not set 10.0.78.2/24 on $ifc"
    else
        echo "   $ifc ($(cat /sys/class/net/$ifc/address)) is 10.0.78.2/24"
        # -w bounds the whole run (the first ping waits for ARP); -c 3 ends it sooner.
        if ping -c 3 -w 30 10.0.78.1 > /tmp/ping 2>&1; then
            echo "   ping 10.0.78.1: $(grep 'packets transmitted' /tmp/ping)"
        else
            fail "ping 10.0.78.1: $(tail -n 2 /tmp/ping | tr '\n' ' ')"
        fi
    fi
fi

echo "== 9p: a host directory on the virtio-9p, through Linux's 9p file system"
p9=$(find_dev 0x1af4 0x1049)
if [ -z "$p9" ]; then
    echo "   no virtio-9p on the bus (this server has none)"
else
    tag= i=0
    while [ -z "$tag" ] && [ $i -lt 100 ]; do
        tag=$(cat /sys/bus/pci/devices/$p9/virtio*/mount_tag 2>/dev/null)
        [ -n "$tag" ] || sleep 0.1
        i=$((i+1))
    done
    mkdir -p /mnt/share
    if [ -z "$tag" ]; then
        fail "no mount tag under the virtio-9p ($p9)"
    elif mount -t 9p -o trans=virtio,version=9p2000.L "$tag" /mnt/share; then
        echo "   mounted tag $tag on /mnt/share: $(ls /mnt/share | tr '\n' ' ')"
        if [ -f /mnt/share/hello.txt ]; then
            echo "   hello.txt says: $(cat /mnt/share/hello.txt)"
        else
            fail "no hello.txt in the export"
        fi
        echo "hello from the guest, through virtio-9p" > /mnt/share/from-guest.txt \
            && echo "   wrote from-guest.txt" || fail "could not write /mnt/share/from-guest.txt"
        umount /mnt/share || fail "umount /mnt/share"
    else
        fail "mount -t 9p $tag"
    fi
fi

echo "== console: a line on hvc0 (its host end is a UNIX socket)"
if wait_for /dev/hvc0; then
    echo "hello from the guest on hvc0" > /dev/hvc0 && echo "   sent"
else
    fail "no /dev/hvc0"
fi

echo "== framebuffer: Linux's bochs driver on the vesa-fb, /dev/fb0"
drawn=no
if wait_for /dev/fb0; then
    fb=/sys/class/graphics/fb0
    s=$(cat $fb/stride) h=$(cut -d, -f2 $fb/virtual_size)
    echo "   $(cat $fb/name): $(cat $fb/virtual_size | tr , x), $(cat $fb/bits_per_pixel) bpp"
    # fbcon lets go of the screen, so its text and cursor do not land on the picture.
    for v in /sys/class/vtconsole/vtcon*; do
        grep -q 'frame buffer' $v/name && echo 0 > $v/bind
    done
    # Eight horizontal bands, one colour each (pixels are B, G, R, unused).
    : > /tmp/screen
    for c in '\0\0\377' '\0\377\0' '\377\0\0' '\0\377\377' \
             '\377\0\377' '\377\377\0' '\377\377\377' '\100\100\100'; do
        printf "$c\0" > /tmp/band
        # Doubled until it fills h/8 rows, then cut there.
        while [ $(wc -c < /tmp/band) -lt $((s * h / 8)) ]; do
            cat /tmp/band /tmp/band > /tmp/band2 && mv /tmp/band2 /tmp/band
        done
        head -c $((s * h / 8)) /tmp/band >> /tmp/screen
    done
    # Eight rows a write: Linux 6.1's fbdev computes an empty damage
    # rectangle for a write of exactly one scanline.
    dd if=/tmp/screen of=/dev/fb0 bs=$((s * 8)) 2>/dev/null && drawn=yes
    sleep 1  # the fbdev emulation copies its shadow buffer to VRAM from a worker
    echo "   drew 8 colour bands: $drawn"
else
    fail "no /dev/fb0"
fi

echo "== console: the named port org.devmodel.agent (virtio-serial)"
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = org.devmodel.agent ] && port=/dev/${p##*/}
done
if [ -n "$port" ] && wait_for "$port"; then
    exec 4<>"$port"
    # The host end answers this line, after saving a screendump when drawn=yes.
    echo "hello from the guest on org.devmodel.agent, drawn=$drawn" >&4
    if read -t 60 -r answer <&4; then
        echo "   $port sent a line and the host answered: $answer"
    else
        fail "no answer from the host on $port"
    fi
    if [ -n "$(find_dev 0x1af4 0x1045)" ]; then
        echo "== balloon: the host sets a target (asked on $port), Linux's virtio_balloon inflates"
        echo "balloon: set my target" >&4
        # The host answers once the driver holds the target, or after 90 s.
        if read -t 120 -r answer <&4; then
            echo "   the host answered: $answer"
            echo "   /proc/vmstat balloon_inflate: $(grep '^balloon_inflate ' /proc/vmstat | cut -d' ' -f2) pages"
        else
            fail "no answer from the host about the balloon"
        fi
    fi
    exec 4>&-
else
    fail "no port named org.devmodel.agent"
fi
exit $failed
