"""VERSION: the first message, with the capabilities JSON (spec, "Version").

QEMU 10.1+ proposes 0.0 with a NUL-terminated JSON object; unknown
capability keys are kept, known ones are range-checked.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Self

from .header import (
    DEFAULT_MAX_DATA_XFER,
    MAX_DATA_XFER_LIMIT,
    PAGE_SIZE,
    U64,
    ProtocolError,
    need_payload,
)

VERSION_MAJOR: Final = 0
VERSION_MINOR: Final = 0
MAX_VERSION_JSON: Final = 4096  # capabilities are a few hundred bytes

_VERSION: Final = struct.Struct("<HH")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The "capabilities" object of VERSION (spec defaults where absent)."""

    max_msg_fds: int = 1
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER
    max_dma_maps: int = 65535
    pgsizes: int = PAGE_SIZE
    write_multiple: bool = False

    @classmethod
    def from_json(cls, caps: Mapping[str, object]) -> Self:
        def number(name: str, default: int, lo: int, hi: int) -> int:
            value = caps.get(name, default)
            # bool is an int subclass; JSON true is not a number.
            if isinstance(value, bool) or not isinstance(value, int):
                raise ProtocolError(f"VERSION capability {name!r} is not an integer: {value!r}")
            if not lo <= value <= hi:
                raise ProtocolError(f"VERSION capability {name}={value} is not {lo}..{hi}")
            return value

        multiple = caps.get("write_multiple", False)
        if not isinstance(multiple, bool):
            raise ProtocolError(
                f"VERSION capability 'write_multiple' is not a boolean: {multiple!r}"
            )
        return cls(
            max_msg_fds=number("max_msg_fds", 1, 0, 1024),
            max_data_xfer_size=number(
                "max_data_xfer_size", DEFAULT_MAX_DATA_XFER, 1, MAX_DATA_XFER_LIMIT
            ),
            max_dma_maps=number("max_dma_maps", 65535, 0, 1 << 32),
            pgsizes=number("pgsizes", PAGE_SIZE, 1, U64 - 1),
            write_multiple=multiple,
        )

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": self.pgsizes,
            "max_dma_maps": self.max_dma_maps,
        }
        if self.write_multiple:  # absent means false; QEMU then never sends WRITE_MULTI
            out["write_multiple"] = True
        return out


@dataclass(frozen=True, slots=True)
class Version:
    major: int
    minor: int
    capabilities: Capabilities | None = None  # None: no JSON at all
    extra: Mapping[str, object] = field(default_factory=dict)  # unknown capability keys

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        need_payload(payload, _VERSION.size, "VERSION")
        major, minor = _VERSION.unpack_from(payload)
        text = payload[_VERSION.size :]
        if not text:
            return cls(major, minor)
        if len(text) > MAX_VERSION_JSON:
            raise ProtocolError(f"VERSION data of {len(text)} bytes; at most {MAX_VERSION_JSON}")
        if text[-1] != 0:
            raise ProtocolError("VERSION data is not NUL-terminated")
        try:
            document = json.loads(text[:-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(f"VERSION data is not UTF-8 JSON: {e}") from None
        if not isinstance(document, dict):
            raise ProtocolError("VERSION data is not a JSON object")
        caps = document.get("capabilities", {})
        if not isinstance(caps, dict):
            raise ProtocolError("VERSION 'capabilities' is not a JSON object")
        known = set(Capabilities.__dataclass_fields__)
        extra = {k: v for k, v in caps.items() if k not in known}
        return cls(major, minor, Capabilities.from_json(caps), extra)

    def encode(self) -> bytes:
        head = _VERSION.pack(self.major, self.minor)
        if self.capabilities is None:
            return head
        document = {"capabilities": {**self.capabilities.to_json(), **self.extra}}
        text = json.dumps(document, separators=(",", ":")).encode()
        return head + text + b"\0"
