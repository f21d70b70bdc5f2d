"""The KVM frontend: a VMM in Python (ctypes ioctls) whose PCI devices live in the device server.

abi.py      ioctl numbers and kernel structs
vm.py       /dev/kvm, guest RAM (memfd), memslots, vCPU threads and the exit loop
ramlayout.py   guest RAM around the 32-bit PCI hole: one memslot below it, one from 4 GiB
boot.py     64-bit long-mode entry for a freestanding guest program
runner.py   a freestanding program on N vCPUs with its devices served (the CLI's `run`)
linux.py    Linux boot protocol builders: bzImage/vmlinux parsing, zero page, e820, MP table
linux_boot.py  writes them into a VM and sets up the vCPUs (64-bit entry)
linux_cli.py   `run --kernel`: refuses under kvm_pvm unless --force
firmware.py    the BIOS's part for a served vesa-fb: BARs, a mode, screen_info
devices.py  the 16550 UART, the debug-exit port, PCI forwarding to the device server
intx.py     INTx pins onto IOAPIC GSIs (swizzle, wire-OR of shared lines)
memslots.py shared-memory BARs as memslots that follow the BAR
guest/      the freestanding PCI test program (C) and how to build it
"""
