"""The test guest: Debian 12's kernel and a busybox initramfs built from Debian packages.

`image.build_image()` builds (and caches) it; `console` is the marker protocol
its /init speaks on the serial console; `vmm_client.qemu.launch` boots it.
Importing this package does nothing on the host; the CLI is
`python -m vmm_client.guest`.
"""

__all__: list[str] = []
