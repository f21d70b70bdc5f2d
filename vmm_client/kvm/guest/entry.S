/* Entry of the freestanding guest program: the VMM starts us here in 64-bit
 * long mode, ring 0, interrupts off, with a stack. Call the C program and hand
 * its result to the debug-exit port (0xF4), which ends the run; hlt is only
 * reached if the VMM ignored the port. */
    .section .text.entry, "ax"
    .globl _start
    .code64
_start:
    call pcitest_main
    movw $0xf4, %dx
    outl %eax, %dx
1:  hlt
    jmp 1b
