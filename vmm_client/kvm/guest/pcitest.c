/*
 * pcitest: a freestanding guest program that does what a kernel's PCI core
 * does, on a VMM whose PCI devices live in the device server.
 *
 * It enumerates bus 0 through 0xCF8/0xCFC, sizes every BAR (and the ROM),
 * assigns addresses, enables decoding, then on each PCI test device
 * (1234:7e57) reads ID through the IO BAR and the memory BAR, writes SCRATCH
 * through one and reads it through the other, moves the memory BAR while it
 * decodes and checks the old address is dead and the new one answers, and
 * rings a doorbell with MSI-X on. Results go to the UART as lines
 * "CHECK <what> got=<x> want=<y> ok|FAIL" and "BAR <dev> <n> <kind> size=<s>
 * addr=<a>", so the host side can parse them; the number of failures is the
 * exit status (0xF4).
 *
 * Ring 0 code runs through an instruction emulator under kvm_pvm (about
 * 1 us an instruction), so this stays small and simple. Build flags (see
 * build.py): -ffreestanding -nostdlib -fno-pic -mgeneral-regs-only -mno-sse
 * -mno-mmx -mno-popcnt -mno-red-zone.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define COM1 0x3f8
#define LSR_THRE 0x20
#define TESTDEV_VENDOR 0x1234
#define TESTDEV_DEVICE 0x7e57
#define TESTDEV_ID 0x7e570001u
#define REG_ID 0x00
#define REG_SCRATCH 0x04
#define REG_DOORBELL 0x08
#define REG_IRQ_STATUS 0x0c
#define REG_BAR_INDEX 0x10
#define REG_DMA_ADDR_LO 0x18
#define REG_DMA_ADDR_HI 0x1c
#define REG_DMA_LEN 0x20
#define REG_DMA_CMD 0x24
#define REG_DMA_STATUS 0x28
#define DMA_FROM_GUEST 1
#define DMA_TO_GUEST 2
#define DMA_BUSY 1
#define DMA_DONE 2
#define DMA_ERROR 4
#define DMA_LEN 64
#define TESTDEV_RAM 0x1000
#define IO_WINDOW 0xc000u
#define MEM_WINDOW 0xe0000000ull
#define MOVE_BY 0x100000ull
#define MSI_ADDRESS 0xfee00000u
#define MSI_VECTOR 0x41u
#define LAPIC_SVR (MSI_ADDRESS + 0xf0)
#define LAPIC_IRR (MSI_ADDRESS + 0x200)

enum { BAR_NONE, BAR_IO, BAR_MEM32, BAR_MEM64 };
static const char *const kind_names[] = {"none", "io", "mem32", "mem64"};

struct bar {
    u64 size;
    u64 addr;
    u8 kind;
    u8 prefetchable;
};

struct function {
    u8 slot;
    u16 vendor, device;
    u32 class_rev;
    struct bar bars[6];
    u32 rom_size;
};

static struct function found[32];
/* Guest RAM the device reads and writes; identity mapped, so its address is
 * its guest-physical address. */
static u8 dma_buffer[DMA_LEN] __attribute__((aligned(64)));
static int nfound;
static int failures;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }

/* -- output */

static void putc(char c)
{
    while (!(inb(COM1 + 5) & LSR_THRE))
        ;
    outb(COM1, (u8)c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void puthex(u64 v)
{
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts(&buf[i]);
}

static void puthex2(u8 v)
{
    putc("0123456789abcdef"[v >> 4]);
    putc("0123456789abcdef"[v & 15]);
}

static void putdec(u32 v)
{
    char buf[11];
    int i = 10;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(&buf[i]);
}

static void check(const char *what, u64 got, u64 want)
{
    puts("CHECK ");
    puts(what);
    puts(" got=");
    puthex(got);
    puts(" want=");
    puthex(want);
    if (got == want) {
        puts(" ok\n");
    } else {
        puts(" FAIL\n");
        failures++;
    }
}

/* -- configuration mechanism #1 */

static u32 cf8(u8 slot, u16 offset)
{
    return 0x80000000u | ((u32)slot << 11) | (offset & 0xfc);
}

static u32 cfg_read32(u8 slot, u16 offset)
{
    outl(0xcf8, cf8(slot, offset));
    return inl(0xcfc);
}

static u16 cfg_read16(u8 slot, u16 offset)
{
    outl(0xcf8, cf8(slot, offset));
    return inw(0xcfc + (offset & 2));
}

static u8 cfg_read8(u8 slot, u16 offset)
{
    outl(0xcf8, cf8(slot, offset));
    return inb(0xcfc + (offset & 3));
}

static void cfg_write32(u8 slot, u16 offset, u32 v)
{
    outl(0xcf8, cf8(slot, offset));
    outl(0xcfc, v);
}

static void cfg_write16(u8 slot, u16 offset, u16 v)
{
    outl(0xcf8, cf8(slot, offset));
    outw(0xcfc + (offset & 2), v);
}

/* -- enumeration, sizing, assignment */

static void size_bars(struct function *f)
{
    u8 s = f->slot;
    u16 command = cfg_read16(s, 0x04);
    cfg_write16(s, 0x04, command & ~3); /* no decoding while the BARs hold sizing patterns */
    for (int i = 0; i < 6; i++) {
        u16 reg = (u16)(0x10 + 4 * i);
        u32 orig = cfg_read32(s, reg);
        cfg_write32(s, reg, 0xffffffffu);
        u32 v = cfg_read32(s, reg);
        cfg_write32(s, reg, orig);
        if (v == 0)
            continue;
        struct bar *b = &f->bars[i];
        if (v & 1) {
            b->kind = BAR_IO;
            b->size = (u16)(~(v & ~3u) + 1);
        } else if (((v >> 1) & 3) == 2 && i < 5) {
            u32 orig_hi = cfg_read32(s, reg + 4);
            cfg_write32(s, reg + 4, 0xffffffffu);
            u32 hi = cfg_read32(s, reg + 4);
            cfg_write32(s, reg + 4, orig_hi);
            b->kind = BAR_MEM64;
            b->size = ~(((u64)hi << 32) | (v & ~0xfu)) + 1;
            b->prefetchable = (v >> 3) & 1;
            i++; /* the upper half is not a BAR of its own */
        } else {
            b->kind = BAR_MEM32;
            b->size = (u32)(~(v & ~0xfu) + 1);
            b->prefetchable = (v >> 3) & 1;
        }
    }
    u32 rom = cfg_read32(s, 0x30);
    cfg_write32(s, 0x30, 0xfffff800u);
    u32 rom_mask = cfg_read32(s, 0x30);
    cfg_write32(s, 0x30, rom);
    f->rom_size = rom_mask ? ~(rom_mask & 0xfffff800u) + 1 : 0;
    cfg_write16(s, 0x04, command);
}

static u64 align_up(u64 v, u64 a) { return (v + a - 1) & ~(a - 1); }

static void assign_bars(struct function *f, u64 *io_next, u64 *mem_next)
{
    for (int i = 0; i < 6; i++) {
        struct bar *b = &f->bars[i];
        u16 reg = (u16)(0x10 + 4 * i);
        if (b->kind == BAR_NONE)
            continue;
        u64 *next = b->kind == BAR_IO ? io_next : mem_next;
        b->addr = align_up(*next, b->size);
        *next = b->addr + b->size;
        cfg_write32(f->slot, reg, (u32)b->addr);
        if (b->kind == BAR_MEM64)
            cfg_write32(f->slot, reg + 4, (u32)(b->addr >> 32));
        puts("BAR ");
        putdec(f->slot);
        puts(" ");
        putdec((u32)i);
        puts(" ");
        puts(kind_names[b->kind]);
        puts(b->prefetchable ? " pref" : "");
        puts(" size=");
        puthex(b->size);
        puts(" addr=");
        puthex(b->addr);
        puts("\n");
    }
    cfg_write16(f->slot, 0x04, 0x7); /* IO | MEM | bus master */
}

static void enumerate(void)
{
    for (u8 slot = 0; slot < 32; slot++) {
        u32 id = cfg_read32(slot, 0x00);
        if ((id & 0xffff) == 0xffff)
            continue;
        struct function *f = &found[nfound++];
        f->slot = slot;
        f->vendor = (u16)id;
        f->device = (u16)(id >> 16);
        f->class_rev = cfg_read32(slot, 0x08);
        puts("PCI 00:");
        puthex2(slot);
        puts(".0 id=");
        puthex(id);
        puts(" class=");
        puthex(f->class_rev >> 8);
        puts(" header=");
        puthex(cfg_read8(slot, 0x0e));
        puts("\n");
    }
}

/* -- the test device */

static u8 find_capability(u8 slot, u8 id)
{
    if (!(cfg_read16(slot, 0x06) & 0x10))
        return 0;
    u8 at = cfg_read8(slot, 0x34) & 0xfc;
    for (int guard = 0; at && guard < 48; guard++) {
        if (cfg_read8(slot, at) == id)
            return at;
        at = cfg_read8(slot, at + 1) & 0xfc;
    }
    return 0;
}

/* The DMA engine: device RAM -> guest memory and back. Needs the VMM to have
 * shared guest RAM with the server; without it the engine reports ERROR and
 * the checks are skipped (printed as SKIP). */
static void exercise_dma(struct function *f, u16 io, u64 mem)
{
    for (u32 i = 0; i < DMA_LEN / 4; i++)
        mmio_write32(mem + TESTDEV_RAM + 4 * i, 0xd0d00000u + i + f->slot);
    for (u32 i = 0; i < DMA_LEN; i++)
        dma_buffer[i] = 0;
    outl(io + REG_DMA_ADDR_LO, (u32)(u64)dma_buffer);
    outl(io + REG_DMA_ADDR_HI, 0);
    outl(io + REG_DMA_LEN, DMA_LEN);
    outl(io + REG_DMA_CMD, DMA_TO_GUEST);
    u32 status;
    for (int spins = 0; (status = inl(io + REG_DMA_STATUS)) & DMA_BUSY && spins < 1000; spins++)
        ;
    if (status == DMA_ERROR) {
        puts("SKIP dma: the engine reports ERROR (guest RAM not shared with the server)\n");
        outl(io + REG_DMA_STATUS, DMA_ERROR);
        return;
    }
    check("dma-to-guest-status", status, DMA_DONE);
    u32 bad = 0;
    for (u32 i = 0; i < DMA_LEN / 4; i++)
        bad += ((volatile u32 *)dma_buffer)[i] != 0xd0d00000u + i + f->slot;
    check("dma-to-guest-mismatches", bad, 0);

    /* And back: guest memory -> device RAM, read through the BAR. */
    for (u32 i = 0; i < DMA_LEN / 4; i++)
        ((volatile u32 *)dma_buffer)[i] = 0x600d0000u + i;
    outl(io + REG_DMA_STATUS, DMA_DONE);
    outl(io + REG_DMA_CMD, DMA_FROM_GUEST);
    for (int spins = 0; (status = inl(io + REG_DMA_STATUS)) & DMA_BUSY && spins < 1000; spins++)
        ;
    check("dma-from-guest-status", status, DMA_DONE);
    check("dma-from-guest-last-word", mmio_read32(mem + TESTDEV_RAM + DMA_LEN - 4),
          0x600d0000u + DMA_LEN / 4 - 1);
    outl(io + REG_DMA_STATUS, DMA_DONE);
    /* MSI-X is still off, so completions raised INTx with IRQ_STATUS bit 1: ack. */
    check("dma-intx-cause", inl(io + REG_IRQ_STATUS), 2);
    outl(io + REG_IRQ_STATUS, 2);
}

static void exercise_testdev(struct function *f)
{
    u16 io = (u16)f->bars[0].addr;
    u64 mem = f->bars[2].addr;
    u64 msix = f->bars[4].addr;

    puts("testdev at slot ");
    putdec(f->slot);
    puts("\n");
    check("id-io", inl(io + REG_ID), TESTDEV_ID);
    check("id-mem", mmio_read32(mem + REG_ID), TESTDEV_ID);
    check("bar-index-io", inl(io + REG_BAR_INDEX), 0);
    check("bar-index-mem", mmio_read32(mem + REG_BAR_INDEX), 2);
    outl(io + REG_SCRATCH, 0x12345678u);
    check("scratch-io-to-mem", mmio_read32(mem + REG_SCRATCH), 0x12345678u);
    mmio_write32(mem + REG_SCRATCH, 0xcafef00du ^ f->slot);
    check("scratch-mem-to-io", inl(io + REG_SCRATCH), 0xcafef00du ^ f->slot);
    mmio_write32(mem + TESTDEV_RAM + 8, 0x5a5aa5a5u);
    check("ram", mmio_read32(mem + TESTDEV_RAM + 8), 0x5a5aa5a5u);
    exercise_dma(f, io, mem);

    /* Move the 64-bit memory BAR while MEM decoding stays on (low dword; the
     * high one is unchanged). */
    u64 moved = mem + MOVE_BY;
    cfg_write32(f->slot, 0x18, (u32)moved);
    cfg_write32(f->slot, 0x1c, (u32)(moved >> 32));
    f->bars[2].addr = moved;
    puts("MOVED ");
    putdec(f->slot);
    puts(" 2 ");
    puthex(mem);
    puts(" -> ");
    puthex(moved);
    puts("\n");
    check("moved-id", mmio_read32(moved + REG_ID), TESTDEV_ID);
    check("moved-scratch", mmio_read32(moved + REG_SCRATCH), 0xcafef00du ^ f->slot);
    check("old-address-dead", mmio_read32(mem + REG_ID), 0xffffffffu);
    check("bar-register", cfg_read32(f->slot, 0x18) & ~0xfu, (u32)moved);

    /* MSI-X: entry 0 -> the LAPIC, enable, ring doorbell 0. The guest takes no
     * interrupts (no IDT, IF=0), but its in-kernel LAPIC accepts the MSI the
     * VMM injects and shows it pending in IRR. The doorbell read orders after
     * the posted write, and the server's MSI event precedes that read's reply. */
    u8 cap = find_capability(f->slot, 0x11);
    check("msix-capability", cap != 0, 1);
    if (cap) {
        mmio_write32(msix + 0, MSI_ADDRESS);
        mmio_write32(msix + 4, 0);
        mmio_write32(msix + 8, MSI_VECTOR);
        mmio_write32(msix + 12, 0); /* unmasked */
        u16 control = cfg_read16(f->slot, cap + 2);
        cfg_write16(f->slot, cap + 2, control | 0x8000);
        outl(io + REG_DOORBELL, 0);
        check("doorbells", inl(io + REG_DOORBELL), 1);
        check("msi-pending-in-irr", (mmio_read32(LAPIC_IRR + 0x10 * (MSI_VECTOR / 32)) >> (MSI_VECTOR % 32)) & 1, 1);
    }
}

int pcitest_main(void)
{
    puts("pcitest: start\n");
    /* Software-enable the LAPIC (SVR bit 8) so that MSIs are accepted, not dropped. */
    mmio_write32(LAPIC_SVR, 0x1ff);
    outl(0xcf8, 0x80000000u);
    check("cf8-latch", inl(0xcf8), 0x80000000u);
    enumerate();
    u64 io_next = IO_WINDOW, mem_next = MEM_WINDOW;
    for (int i = 0; i < nfound; i++) {
        size_bars(&found[i]);
        if (found[i].rom_size) {
            puts("ROM ");
            putdec(found[i].slot);
            puts(" size=");
            puthex(found[i].rom_size);
            puts("\n");
        }
        assign_bars(&found[i], &io_next, &mem_next);
    }
    int testdevs = 0;
    for (int i = 0; i < nfound; i++) {
        if (found[i].vendor == TESTDEV_VENDOR && found[i].device == TESTDEV_DEVICE) {
            exercise_testdev(&found[i]);
            testdevs++;
        }
    }
    check("testdevs-found", testdevs > 0, 1);
    puts("pcitest: ");
    putdec((u32)nfound);
    puts(" devices, ");
    putdec((u32)failures);
    puts(" failures\n");
    return failures;
}
