"""QEMU as a frontend for the device server: a cached trixie-backports QEMU (>= 10.1, with
vfio-user-pci) and a launcher that boots the test guest under TCG.

`provision` installs and checks the QEMU tree (root once), `launch` boots the
guest built by `vmm_client.guest`. Importing this package does nothing on the
host; the CLI is `python -m vmm_client.qemu`.
"""

__all__: list[str] = []
