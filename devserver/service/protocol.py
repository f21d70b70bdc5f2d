"""Protocol constants shared by the server and the client library.

Minor versions add to the wire contract (protos/devmodel/v1/devmodel.proto)
without breaking it:

    1.0  the Attach stream, Hello/Welcome, config and BAR accesses, events
    1.1  MemoryMapUpdate (the frontend's memory map may change after Hello),
         DMA served in every memory mode, DMA counters in Stats
    1.2  Screendump (what a display device shows), BarInfo.backing (a
         shared-memory BAR's file, known from the topology before it decodes)
    1.3  Balloon (a virtio-balloon's target, what the guest holds, its stats)
"""

from __future__ import annotations

from typing import Final

PROTOCOL_MAJOR: Final = 1
PROTOCOL_MINOR: Final = 3

# Optional behaviours a frontend may ask for in Hello.features.
FEATURES: Final = frozenset({"batching"})

SERVICE_NAME: Final = "devmodel.v1.DeviceModel"

# Largest message either side accepts: a DMA payload is at most 1 MiB, with room for batching.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
# Largest single DMA transfer the server carries out or asks a frontend for.
MAX_DMA_BYTES: Final = 1024 * 1024
# DMA requests a DMA_MESSAGES frontend may owe the server at once; beyond this
# a device's transfer fails at once instead of queueing without bound.
MAX_DMA_OUTSTANDING: Final = 64
# RGB bytes one Screendump reply carries at most (a 1024x768 picture fits in one).
MAX_SCREENDUMP_BYTES: Final = 3 * 1024 * 1024
