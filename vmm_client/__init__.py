"""The frontends of the split VMM: a KVM VMM and a vfio-user bridge for QEMU.

Both turn guest accesses into requests on the device server's gRPC stream and
apply the events it sends back. The pure parts (address decoding, routing)
live in `vmm_client.addressing` and `vmm_client.routing`.
"""

__all__: list[str] = []
