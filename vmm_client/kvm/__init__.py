"""The KVM frontend: a VMM in Python (ctypes ioctls) whose PCI devices live in the device server.

abi.py      ioctl numbers and kernel structs
vm.py       /dev/kvm, guest RAM (memfd), memslots, vCPU threads and the exit loop
boot.py     64-bit long-mode entry for a freestanding guest program
linux.py    Linux boot protocol builders: bzImage/vmlinux parsing, zero page, e820, MP table
linux_boot.py  writes them into a VM and sets up the vCPUs (64-bit entry)
linux_cli.py   `run --kernel`: refuses under kvm_pvm unless --force
devices.py  the 16550 UART, the debug-exit port, PCI forwarding to the device server
guest/      the freestanding PCI test program (C) and how to build it
"""
