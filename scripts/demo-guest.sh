# The guest half of the main job (scripts/demo.sh): runs in the Linux guest's
# busybox shell, after /init loaded the drivers. Every device it touches is
# served by the device server. Each step says what it did; a step that fails
# says FAILED and the script goes on, then exits non-zero.
failed=0
fail() { echo "   FAILED: $*"; failed=1; }
wait_for() {  # a device node appears once its driver has probed
    i=0; while [ ! -e "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; test -e "$1"
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
    exec 4>&-
else
    fail "no port named org.devmodel.agent"
fi
exit $failed
