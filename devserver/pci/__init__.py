"""PCI and PCI Express configuration space, BARs and capabilities (no I/O)."""
