"""Virtio 1.2 (OASIS virtio-v1.2-cs01) without I/O: constants, status and feature
negotiation, split virtqueues, descriptor chains, and the modern PCI transport.

Devices implement `device.VirtioDevice`; `pci_transport.VirtioPciFunction`
puts one on the PCI bus. Nothing here imports asyncio, os, socket or mmap.
"""
