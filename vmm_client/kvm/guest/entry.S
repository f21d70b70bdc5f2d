/* Entry of the freestanding guest program: the VMM starts every vCPU here in
 * 64-bit long mode, interrupts off, each with its own stack, and with
 * (cpu index, number of cpus, bytes of RAM above 4 GiB) in rdi, rsi, rdx.
 * CPU 0 calls the C program and hands its result to the debug-exit port
 * (0xF4), which ends the run; the others go to ap_main, which never returns.
 * hlt is only reached if the VMM ignored the port. */
    .section .text.entry, "ax"
    .globl _start
    .code64
_start:
    test %edi, %edi
    jnz 2f
    call pcitest_main
    movw $0xf4, %dx
    outl %eax, %dx
1:  hlt
    jmp 1b
2:  call ap_main
    jmp 1b
