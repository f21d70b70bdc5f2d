"""Device models: one module per device, pure, on top of devserver.pci."""
