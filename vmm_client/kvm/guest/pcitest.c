/*
 * pcitest: a freestanding guest program that does what a kernel's PCI core
 * does, on a VMM whose PCI devices live in the device server.
 *
 * It enumerates bus 0 through 0xCF8/0xCFC, sizes every BAR (and the ROM),
 * assigns addresses, enables decoding, then on each PCI test device
 * (1234:7e57) reads ID through the IO BAR and the memory BAR, writes SCRATCH
 * through one and reads it through the other, moves the memory BAR while it
 * decodes and checks the old address is dead and the new one answers, rings
 * a doorbell with MSI-X on, then with MSI-X off again raises INTx and takes
 * it through the IOAPIC and the LAPIC (level-triggered: acknowledge at the
 * device, then EOI, and it must not come back; kvm_pvm does not track the
 * vector in the LAPIC's ISR, see exercise_intx). A vesa-fb, if served, gets
 * pixels drawn into its VRAM BAR (a memslot in the VMM) before and after the
 * BAR moves. Results go to the UART as
 * lines "CHECK <what> got=<x> want=<y> ok|FAIL" and "BAR <dev> <n> <kind>
 * size=<s> addr=<a>", so the host side can parse them; the number of
 * failures is the exit status (0xF4).
 *
 * The VMM starts every vCPU at _start (entry.S) with (cpu, ncpus,
 * bytes of RAM above 4 GiB) as arguments. CPU 0 runs the test; the others
 * (ap_main) wait for an IPI, then read the test devices' ID registers while
 * CPU 0 works (concurrent exits on several vCPU threads), and take an MSI
 * CPU 0 aims at them. With RAM above 4 GiB (the VMM's second memslot) the
 * DMA engine also reads and writes there.
 *
 * At ring 3 (the VMM's --ring3) there is no IDT to take interrupts with (no
 * TSS for the stack switch), so interrupt delivery is checked only as far as
 * the LAPIC's IRR, and the lines that skip the rest start with "NOTE".
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
#define INTX_VECTOR 0x51u
#define IPI_VECTOR 0x52u
#define AP_MSI_VECTOR 0x53u
#define SPURIOUS_VECTOR 0xffu
#define LAPIC_BASE 0xfee00000ull
#define LAPIC_SVR (LAPIC_BASE + 0xf0)
#define LAPIC_EOI (LAPIC_BASE + 0xb0)
#define LAPIC_ISR (LAPIC_BASE + 0x100)
#define LAPIC_TMR (LAPIC_BASE + 0x180)
#define LAPIC_IRR (LAPIC_BASE + 0x200)
#define LAPIC_ICR_LO (LAPIC_BASE + 0x300)
#define LAPIC_ICR_HI (LAPIC_BASE + 0x310)
#define ICR_ASSERT (1u << 14)
#define IOAPIC_BASE 0xfec00000ull
#define IOAPIC_REDIR(gsi) (0x10u + 2u * (gsi))
#define IOAPIC_ACTIVE_LOW (1u << 13)
#define IOAPIC_REMOTE_IRR (1u << 14)
#define IOAPIC_LEVEL (1u << 15)
#define IOAPIC_MASKED (1u << 16)
#define PCI_GSI_BASE 16u /* the VMM wires swizzled INTA#..INTD# to GSIs 16..19 (intx.py) */
#define PCI_STATUS_INTERRUPT (1u << 3)
#define INTX_CAUSE 3u /* doorbell value: IRQ_STATUS bit 3 */
#define AP_MSI_ENTRY 2u
#define MAX_CPUS 8
#define AP_ROUNDS 16
#define SPIN_LIMIT 200000
#define FOUR_GIB 0x100000000ull
#define FB_VENDOR 0x1234
#define FB_DEVICE 0x1111
#define FB_DISPI 0x500 /* Bochs DISPI registers in BAR2, 16 bits each */
#define DISPI_ID 0
#define DISPI_XRES 1
#define DISPI_YRES 2
#define DISPI_BPP 3
#define DISPI_ENABLE 4
#define DISPI_ENABLED_LFB 0x41
#define FB_WIDTH 64
#define FB_HEIGHT 64
#define FB_MOVE_TO 0xf0000000ull /* above every BAR this program assigns */
#define CODE_SELECTOR 0x08

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
static int ring0; /* interrupts can be taken: we run at CPL 0 with an IDT */
static u32 ncpus;

/* Written by interrupt handlers and other CPUs: volatile, one writer each. */
static volatile u32 intx_count, intx_cause, intx_tmr, intx_remote_irr, intx_gsi;
static volatile u16 intx_io;
static volatile u32 msis_taken, unexpected_interrupts;
static volatile u32 intx_in_service; /* the LAPIC had put the INTx vector in service (ISR) */
static volatile u32 ap_ready[MAX_CPUS], ap_done[MAX_CPUS], ap_ipis[MAX_CPUS], ap_msis[MAX_CPUS];
static volatile u32 ap_reads[MAX_CPUS], ap_reads_ok[MAX_CPUS];
static volatile u32 ap_go;
static u16 ap_ports[32];
static volatile int ap_nports;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void pause(void) { __asm__ volatile("pause"); }

static u32 lapic_bit(u64 bank, u32 vector)
{
    return (mmio_read32(bank + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}

static u32 lapic_id(void) { return mmio_read32(LAPIC_BASE + 0x20) >> 24; }

static u32 ioapic_read(u32 reg)
{
    mmio_write32(IOAPIC_BASE, reg);
    return mmio_read32(IOAPIC_BASE + 0x10);
}

static void ioapic_write(u32 reg, u32 v)
{
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, v);
}

/* -- interrupts (ring 0 only): an IDT of interrupt gates, GCC's interrupt attribute */

struct interrupt_frame;

struct idt_gate {
    u16 offset0, selector;
    u8 ist, attributes;
    u16 offset1;
    u32 offset2, reserved;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));

static void set_gate(u32 vector, void (*handler)(struct interrupt_frame *))
{
    u64 at = (u64)handler;
    idt[vector].offset0 = (u16)at;
    idt[vector].selector = CODE_SELECTOR;
    idt[vector].ist = 0;
    idt[vector].attributes = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
    idt[vector].offset1 = (u16)(at >> 16);
    idt[vector].offset2 = (u32)(at >> 32);
}

static void load_idt(void)
{
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) desc = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(desc));
}

static void eoi(void) { mmio_write32(LAPIC_EOI, 0); }

/* Level-triggered INTx: find the cause, acknowledge it at the device, make
 * sure the acknowledgement reached it (a read orders after the posted write,
 * and the server's deassert event precedes the read's reply, so the line is
 * low now), and only then EOI: an EOI with the line still high would have
 * the IOAPIC deliver again. */
__attribute__((interrupt)) static void intx_handler(struct interrupt_frame *frame)
{
    (void)frame;
    u16 io = intx_io;
    intx_count++;
    intx_tmr = lapic_bit(LAPIC_TMR, INTX_VECTOR);
    intx_remote_irr = (ioapic_read(IOAPIC_REDIR(intx_gsi)) & IOAPIC_REMOTE_IRR) != 0;
    u32 cause = inl(io + REG_IRQ_STATUS);
    intx_cause = cause;
    outl(io + REG_IRQ_STATUS, cause);
    (void)inl(io + REG_IRQ_STATUS);
    intx_in_service = lapic_bit(LAPIC_ISR, INTX_VECTOR);
    eoi();
}

__attribute__((interrupt)) static void msi_handler(struct interrupt_frame *frame)
{
    (void)frame;
    msis_taken++;
    eoi();
}

__attribute__((interrupt)) static void ap_ipi_handler(struct interrupt_frame *frame)
{
    (void)frame;
    ap_ipis[lapic_id() & (MAX_CPUS - 1)]++;
    eoi();
}

__attribute__((interrupt)) static void ap_msi_handler(struct interrupt_frame *frame)
{
    (void)frame;
    ap_msis[lapic_id() & (MAX_CPUS - 1)]++;
    eoi();
}

__attribute__((interrupt)) static void unexpected_handler(struct interrupt_frame *frame)
{
    (void)frame;
    unexpected_interrupts++;
    eoi();
}

/* A spurious interrupt is not in service: no EOI. */
__attribute__((interrupt)) static void spurious_handler(struct interrupt_frame *frame)
{
    (void)frame;
}

static void setup_interrupts(void)
{
    for (u32 v = 32; v < 256; v++)
        set_gate(v, unexpected_handler); /* vectors below 32 are exceptions: left absent */
    set_gate(MSI_VECTOR, msi_handler);
    set_gate(INTX_VECTOR, intx_handler);
    set_gate(IPI_VECTOR, ap_ipi_handler);
    set_gate(AP_MSI_VECTOR, ap_msi_handler);
    set_gate(SPURIOUS_VECTOR, spurious_handler);
}

static int at_ring0(void)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return (cs & 3) == 0;
}

/* Let pending interrupts in for a while (bounded): IF=1 around a pause loop. */
static void take_interrupts(volatile u32 *until_nonzero, int limit)
{
    if (!ring0)
        return;
    __asm__ volatile("sti");
    for (int i = 0; i < limit && !(until_nonzero && *until_nonzero); i++)
        pause();
    __asm__ volatile("cli");
}

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

static void cfg_write8(u8 slot, u16 offset, u8 v)
{
    outl(0xcf8, cf8(slot, offset));
    outb(0xcfc + (offset & 3), v);
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
static u64 high_ram; /* bytes of RAM from 4 GiB (the VMM's second memslot) */
static int high_ram_done;

static u32 dma_wait(u16 io)
{
    u32 status;
    for (int spins = 0; (status = inl(io + REG_DMA_STATUS)) & DMA_BUSY && spins < 1000; spins++)
        ;
    return status;
}

static void dma_start(u16 io, u64 address, u32 command)
{
    outl(io + REG_DMA_STATUS, DMA_DONE | DMA_ERROR);
    outl(io + REG_DMA_ADDR_LO, (u32)address);
    outl(io + REG_DMA_ADDR_HI, (u32)(address >> 32));
    outl(io + REG_DMA_LEN, DMA_LEN);
    outl(io + REG_DMA_CMD, command);
}

/* RAM above 4 GiB, through the CPU and through the device: its last bytes
 * (the end of the second memslot) into device RAM, then device RAM into its
 * first bytes. */
static void exercise_high_ram(struct function *f, u16 io, u64 mem)
{
    u64 top = FOUR_GIB + high_ram - DMA_LEN;
    puts("HIGHRAM ");
    puthex(FOUR_GIB);
    puts(" size=");
    puthex(high_ram);
    puts("\n");
    for (u32 i = 0; i < DMA_LEN / 4; i++)
        ((volatile u32 *)top)[i] = 0x41470000u + i;
    check("high-ram-cpu", ((volatile u32 *)top)[DMA_LEN / 4 - 1], 0x41470000u + DMA_LEN / 4 - 1);
    dma_start(io, top, DMA_FROM_GUEST);
    check("high-ram-dma-from-guest-status", dma_wait(io), DMA_DONE);
    check("high-ram-dma-from-guest-last-word", mmio_read32(mem + TESTDEV_RAM + DMA_LEN - 4),
          0x41470000u + DMA_LEN / 4 - 1);
    for (u32 i = 0; i < DMA_LEN / 4; i++)
        mmio_write32(mem + TESTDEV_RAM + 4 * i, 0x48490000u + i + f->slot);
    dma_start(io, FOUR_GIB, DMA_TO_GUEST);
    check("high-ram-dma-to-guest-status", dma_wait(io), DMA_DONE);
    u32 bad = 0;
    for (u32 i = 0; i < DMA_LEN / 4; i++)
        bad += ((volatile u32 *)FOUR_GIB)[i] != 0x48490000u + i + f->slot;
    check("high-ram-dma-to-guest-mismatches", bad, 0);
    outl(io + REG_DMA_STATUS, DMA_DONE | DMA_ERROR);
}

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
        outl(io + REG_IRQ_STATUS, 2); /* the failed command still raised INTx */
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
    if (high_ram >= 2 * DMA_LEN && !high_ram_done) {
        high_ram_done = 1;
        exercise_high_ram(f, io, mem);
    }
    /* MSI-X is still off, so completions raised INTx with IRQ_STATUS bit 1: ack. */
    check("dma-intx-cause", inl(io + REG_IRQ_STATUS), 2);
    outl(io + REG_IRQ_STATUS, 2);
}

/* -- the framebuffer (vesa-fb): a BAR the VMM maps as a memslot */

static u32 fb_pixel(u32 i) { return 0x005a0000u | ((i & 0xff) << 8) | ((i >> 6) & 0xff); }

static void dispi_write(u64 mmio, u32 index, u16 v) { *(volatile u16 *)(mmio + FB_DISPI + 2 * index) = v; }
static u16 dispi_read(u64 mmio, u32 index) { return *(volatile u16 *)(mmio + FB_DISPI + 2 * index); }

static u32 fb_mismatches(u64 vram, u32 first, u32 count)
{
    u32 bad = 0;
    for (u32 i = first; i < first + count; i++)
        bad += ((volatile u32 *)vram)[i] != fb_pixel(i);
    return bad;
}

/* Draw the top half, move the VRAM BAR while it decodes, check the pixels came
 * along and the old address is dead, draw the bottom half at the new one. The
 * pixel stores hit the memslot (no exit): the server never sees them as BAR
 * writes, but its own mapping of the same memory shows them (the host side
 * takes a screendump at "FBDRAWN"). */
static void exercise_fb(struct function *f)
{
    u64 vram = f->bars[0].addr, mmio = f->bars[2].addr;
    u32 half = FB_WIDTH * FB_HEIGHT / 2;
    puts("FB ");
    putdec(f->slot);
    puts(" vram=");
    puthex(vram);
    puts(" size=");
    puthex(f->bars[0].size);
    puts("\n");
    check("fb-dispi-id", dispi_read(mmio, DISPI_ID), 0xb0c5);
    dispi_write(mmio, DISPI_XRES, FB_WIDTH);
    dispi_write(mmio, DISPI_YRES, FB_HEIGHT);
    dispi_write(mmio, DISPI_BPP, 32);
    dispi_write(mmio, DISPI_ENABLE, DISPI_ENABLED_LFB);
    for (u32 i = 0; i < half; i++)
        ((volatile u32 *)vram)[i] = fb_pixel(i);
    check("fb-top-half", fb_mismatches(vram, 0, half), 0);

    cfg_write32(f->slot, 0x10, (u32)FB_MOVE_TO); /* 32-bit BAR, MEM decoding stays on */
    f->bars[0].addr = FB_MOVE_TO;
    puts("FBMOVED ");
    putdec(f->slot);
    puts(" ");
    puthex(vram);
    puts(" -> ");
    puthex(FB_MOVE_TO);
    puts("\n");
    check("fb-bar-register", cfg_read32(f->slot, 0x10) & ~0xfu, (u32)FB_MOVE_TO);
    check("fb-moved-top-half", fb_mismatches(FB_MOVE_TO, 0, half), 0);
    check("fb-old-address-dead", mmio_read32(vram), 0xffffffffu);
    for (u32 i = half; i < 2 * half; i++)
        ((volatile u32 *)FB_MOVE_TO)[i] = fb_pixel(i);
    check("fb-bottom-half", fb_mismatches(FB_MOVE_TO, half, half), 0);
    puts("FBDRAWN\n");
}

/* MSI-X entry AP_MSI_ENTRY aimed at the last CPU's LAPIC (destination APIC id
 * in address bits 19:12): its handler runs on that CPU, not here. */
static void msi_to_other_cpu(struct function *f, u16 io, u64 msix)
{
    u32 cpu = ncpus - 1;
    u64 entry = msix + 16 * AP_MSI_ENTRY;
    (void)f;
    if (!ring0) {
        puts("NOTE msi-to-cpu: ring 3 takes no interrupts\n");
        return;
    }
    u32 before = ap_msis[cpu];
    mmio_write32(entry + 0, MSI_ADDRESS | (cpu << 12));
    mmio_write32(entry + 4, 0);
    mmio_write32(entry + 8, AP_MSI_VECTOR);
    mmio_write32(entry + 12, 0);
    outl(io + REG_DOORBELL, AP_MSI_ENTRY);
    (void)inl(io + REG_DOORBELL);
    for (int i = 0; i < SPIN_LIMIT && ap_msis[cpu] == before; i++)
        pause();
    check("msi-to-cpu", ap_msis[cpu] - before >= 1, 1); /* kvm_pvm may deliver twice */
    mmio_write32(entry + 12, 1); /* masked again */
}

/* INTx through the IOAPIC: MSI-X is off, so a doorbell asserts INTA#. */
static void exercise_intx(struct function *f, u16 io)
{
    u8 s = f->slot;
    u8 pin = cfg_read8(s, 0x3d);
    check("intx-pin", pin, 1);
    if (pin < 1 || pin > 4)
        return;
    u32 gsi = PCI_GSI_BASE + ((s + pin - 1) & 3); /* the host bridge's swizzle */
    cfg_write8(s, 0x3c, (u8)gsi);                  /* firmware's job: INTERRUPT_LINE */
    check("intx-line", cfg_read8(s, 0x3c), gsi);
    puts("INTX ");
    putdec(s);
    puts(" pin=");
    putdec(pin);
    puts(" gsi=");
    putdec(gsi);
    puts("\n");
    ioapic_write(IOAPIC_REDIR(gsi) + 1, 0u << 24); /* destination: APIC id 0 (this CPU) */
    ioapic_write(IOAPIC_REDIR(gsi), INTX_VECTOR | IOAPIC_ACTIVE_LOW | IOAPIC_LEVEL);
    intx_io = io;
    intx_gsi = gsi;
    intx_count = 0;
    check("intx-status-before", (cfg_read16(s, 0x06) & PCI_STATUS_INTERRUPT) != 0, 0);
    outl(io + REG_DOORBELL, INTX_CAUSE);
    /* A read orders after the posted doorbell; the server's INTx event precedes
     * its reply, and the VMM raised the GSI on that event: the line is up now. */
    (void)inl(io + REG_DOORBELL);
    check("intx-status-bit", (cfg_read16(s, 0x06) & PCI_STATUS_INTERRUPT) != 0, 1);
    check("intx-pending-in-irr", lapic_bit(LAPIC_IRR, INTX_VECTOR), 1);
    check("intx-remote-irr-pending", (ioapic_read(IOAPIC_REDIR(gsi)) & IOAPIC_REMOTE_IRR) != 0, 1);
    if (ring0) {
        for (int tries = 0; !intx_count && tries < 4; tries++)
            __asm__ volatile("sti; hlt; cli"); /* pending: taken at once */
        check("intx-received", intx_count >= 1, 1);
        check("intx-cause", intx_cause, 1u << INTX_CAUSE);
        check("intx-level-triggered", intx_tmr, 1);
        check("intx-remote-irr-in-handler", intx_remote_irr, 1);
        if (intx_in_service) {
            check("intx-remote-irr-after-eoi", (ioapic_read(IOAPIC_REDIR(gsi)) & IOAPIC_REMOTE_IRR) != 0, 0);
            check("intx-not-pending-after-eoi", lapic_bit(LAPIC_IRR, INTX_VECTOR), 0);
            take_interrupts(0, 200); /* the line went down before the EOI: nothing comes back */
            check("intx-once", intx_count, 1);
        } else {
            /* kvm_pvm runs emulated ring-0 handlers without the LAPIC moving the
             * vector from IRR to ISR, so the EOI finds nothing in service and
             * never reaches the IOAPIC. Clear remote IRR the way Linux does for
             * IOAPICs without an EOI register (__eoi_ioapic_pin): edge, then level. */
            puts("NOTE intx-eoi: the LAPIC did not put the vector in service (kvm_pvm); "
                 "remote IRR cleared by an edge/level toggle\n");
            ioapic_write(IOAPIC_REDIR(gsi), IOAPIC_MASKED | INTX_VECTOR);
            ioapic_write(IOAPIC_REDIR(gsi), IOAPIC_MASKED | INTX_VECTOR | IOAPIC_LEVEL);
            check("intx-remote-irr-after-toggle", (ioapic_read(IOAPIC_REDIR(gsi)) & IOAPIC_REMOTE_IRR) != 0, 0);
        }
    } else {
        puts("NOTE intx-delivery: ring 3 takes no interrupts; acknowledged by polling\n");
        outl(io + REG_IRQ_STATUS, 1u << INTX_CAUSE);
    }
    check("intx-irq-status-after-ack", inl(io + REG_IRQ_STATUS), 0);
    check("intx-status-after-ack", (cfg_read16(s, 0x06) & PCI_STATUS_INTERRUPT) != 0, 0);
    ioapic_write(IOAPIC_REDIR(gsi), IOAPIC_MASKED | INTX_VECTOR);
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
        check("msi-pending-in-irr", lapic_bit(LAPIC_IRR, MSI_VECTOR), 1);
        if (ring0) {
            u32 before = msis_taken;
            for (int tries = 0; msis_taken == before && tries < 4; tries++)
                __asm__ volatile("sti; hlt; cli"); /* pending: taken at once */
            check("msi-taken", msis_taken - before >= 1, 1);
        }
        if (ncpus > 1)
            msi_to_other_cpu(f, io, msix);
        /* MSI-X off again: the function falls back to INTx. */
        cfg_write16(f->slot, cap + 2, control & ~0x8000);
    }
    exercise_intx(f, io);
}

/* -- the other CPUs */

/* Wake the others with an IPI (ring 0) once there is something to read; they
 * read every test device's ID through its IO BAR while CPU 0 goes on. */
static void start_aps(void)
{
    for (u32 cpu = 1; cpu < ncpus; cpu++) {
        int spins = 0;
        while (!ap_ready[cpu] && spins++ < SPIN_LIMIT)
            pause();
        check("ap-ready", ap_ready[cpu], 1);
    }
    ap_go = 1;
    if (!ring0)
        return;
    for (u32 cpu = 1; cpu < ncpus; cpu++) {
        mmio_write32(LAPIC_ICR_HI, cpu << 24);
        mmio_write32(LAPIC_ICR_LO, IPI_VECTOR | ICR_ASSERT); /* fixed, physical */
    }
}

static void finish_aps(void)
{
    for (u32 cpu = 1; cpu < ncpus; cpu++) {
        int spins = 0;
        while (!ap_done[cpu] && spins++ < SPIN_LIMIT)
            pause();
        puts("AP ");
        putdec(cpu);
        puts(" reads=");
        putdec(ap_reads[cpu]);
        puts(" ipis=");
        putdec(ap_ipis[cpu]);
        puts(" msis=");
        putdec(ap_msis[cpu]);
        puts("\n");
        check("ap-done", ap_done[cpu], 1);
        check("ap-reads", ap_reads[cpu], (u32)(AP_ROUNDS * ap_nports));
        check("ap-reads-ok", ap_reads_ok[cpu], ap_reads[cpu]);
        if (ring0)
            check("ap-ipi", ap_ipis[cpu] >= 1, 1); /* kvm_pvm may deliver twice */
    }
}

volatile u32 idt_ready; /* CPU 0 filled the IDT: the others may load it */

void ap_main(u32 cpu)
{
    int ring0 = at_ring0(); /* ours, not CPU 0's global (same value: one --ring3 for all) */
    if (cpu >= MAX_CPUS)
        for (;;)
            pause();
    while (!idt_ready)
        pause();
    if (ring0) {
        load_idt(); /* the same table CPU 0 filled before anyone could take an interrupt */
        mmio_write32(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
    }
    ap_ready[cpu] = 1;
    while (!ap_go) {
        if (ring0)
            __asm__ volatile("sti; hlt; cli"); /* sti's shadow: the IPI cannot slip past */
        else
            pause();
    }
    for (int round = 0; round < AP_ROUNDS; round++) {
        for (int i = 0; i < ap_nports; i++) {
            ap_reads_ok[cpu] += inl(ap_ports[i] + REG_ID) == TESTDEV_ID;
            ap_reads[cpu]++;
        }
    }
    ap_done[cpu] = 1;
    for (;;) {
        if (ring0)
            __asm__ volatile("sti; hlt; cli");
        else
            pause();
    }
}

/* CPU 0's entry (the others go to ap_main, entry.S). */
int pcitest_main(u32 cpu, u32 cpus, u64 high)
{
    (void)cpu;
    ncpus = cpus > MAX_CPUS ? MAX_CPUS : cpus;
    high_ram = high;
    ring0 = at_ring0();
    if (ring0) {
        setup_interrupts();
        load_idt();
    }
    idt_ready = 1;
    puts("pcitest: start, ");
    putdec(ncpus);
    puts(ncpus == 1 ? " cpu" : " cpus");
    puts(ring0 ? ", ring 0\n" : ", ring 3\n");
    /* Software-enable the LAPIC (SVR bit 8) so that MSIs are accepted, not dropped. */
    mmio_write32(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
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
    for (int i = 0; i < nfound; i++)
        if (found[i].vendor == TESTDEV_VENDOR && found[i].device == TESTDEV_DEVICE)
            ap_ports[ap_nports++] = (u16)found[i].bars[0].addr;
    if (ncpus > 1)
        start_aps();
    /* The framebuffer first: its VRAM moves out of the way before the test
     * devices' memory BARs move up by MOVE_BY. */
    for (int i = 0; i < nfound; i++)
        if (found[i].vendor == FB_VENDOR && found[i].device == FB_DEVICE)
            exercise_fb(&found[i]);
    for (int i = 0; i < nfound; i++) {
        if (found[i].vendor == TESTDEV_VENDOR && found[i].device == TESTDEV_DEVICE) {
            exercise_testdev(&found[i]);
            testdevs++;
        }
    }
    check("testdevs-found", testdevs > 0, 1);
    if (ncpus > 1)
        finish_aps();
    if (ring0) {
        take_interrupts(0, 100); /* anything still pending (the MSIs of CPU 0) */
        check("unexpected-interrupts", unexpected_interrupts, 0);
    }
    puts("pcitest: ");
    putdec((u32)nfound);
    puts(" devices, ");
    putdec((u32)failures);
    puts(" failures\n");
    return failures;
}
