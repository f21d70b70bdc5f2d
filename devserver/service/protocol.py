"""Protocol constants shared by the server and the client library."""

from __future__ import annotations

from typing import Final

PROTOCOL_MAJOR: Final = 1
PROTOCOL_MINOR: Final = 0

# Optional behaviours a frontend may ask for in Hello.features.
FEATURES: Final = frozenset({"batching"})

SERVICE_NAME: Final = "devmodel.v1.DeviceModel"

# Largest message either side accepts: a DMA payload is at most 1 MiB, with room for batching.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
