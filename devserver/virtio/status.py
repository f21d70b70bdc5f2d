"""Device status and feature negotiation (virtio 1.2 §2.1 Device Status Field,
§2.2 Feature Bits, §3.1.1 Driver Requirements: Device Initialization).

Everything that decides a status transition lives in this file (h11's rule 1),
and the transitions are data: `TRANSITIONS` says, for each bit a driver may set,
which bits must be set with it and what happens when it becomes set.

    0 ──ACKNOWLEDGE──▶ 1 ──DRIVER──▶ 3 ──FEATURES_OK──▶ 0xb ──DRIVER_OK──▶ 0xf
    │                                 (refused: unoffered      (activate the device)
    │                                  feature, no VERSION_1)
    any state ──write 0──▶ reset;  any state ──device error──▶ | DEVICE_NEEDS_RESET (latched)

Guest misuse is not an error here, it is a transition that does not happen:
- a bit set without its prerequisites is dropped (the driver sees it missing
  when it reads the status back, as §3.1.1 tells it to check FEATURES_OK);
- clearing bits other than by writing 0 is ignored ("The driver MUST NOT clear
  a device status bit", §2.1.1);
- DEVICE_NEEDS_RESET is the device's: a driver write of it is ignored, and once
  latched it stays until reset;
- features are frozen once FEATURES_OK is set (§2.2.1 "MUST NOT accept" after).
"""

from __future__ import annotations

import enum
from typing import Final

from ..errors import ConfigError
from .spec import FEATURE_PAGES, VIRTIO_F_VERSION_1, DeviceStatus, feature_bit

_U32: Final = 0xFFFF_FFFF


class StatusAction(enum.Enum):
    """What a status write asks the transport to do, beyond storing the byte."""

    RESET = "reset"  # 0 was written: reset the device (§2.1.2, §4.1.4.3.2)
    ACTIVATE = "activate"  # DRIVER_OK became set: the device may use its queues


_A = DeviceStatus.ACKNOWLEDGE
_D = DeviceStatus.DRIVER
_F = DeviceStatus.FEATURES_OK
_OK = DeviceStatus.DRIVER_OK
_NONE = DeviceStatus(0)

# (bit, bits that must be set in the same status value, action when it becomes set),
# in the order §3.1.1 sets them. FEATURES_OK also needs negotiation to succeed.
TRANSITIONS: Final[tuple[tuple[DeviceStatus, DeviceStatus, StatusAction | None], ...]] = (
    (_A, _NONE, None),
    (_D, _A, None),
    (_F, _A | _D, None),
    (_OK, _A | _D | _F, StatusAction.ACTIVATE),
    (DeviceStatus.FAILED, _NONE, None),
)
DRIVER_BITS: Final = _A | _D | _F | _OK | DeviceStatus.FAILED


class VirtioStatus:
    """The device_status byte and the feature words of one device.

    `offered` is what the device offers (device_feature); `driver_features`
    what the driver last wrote (driver_feature, masked to 64 bits); `acked`
    the negotiated set, valid once FEATURES_OK is set (0 before).
    """

    __slots__ = ("acked", "driver_features", "offered", "required", "status")

    def __init__(self, offered: int, required: int = feature_bit(VIRTIO_F_VERSION_1)) -> None:
        if not 0 <= offered < 1 << (32 * FEATURE_PAGES):
            raise ConfigError(f"offered features {offered:#x} do not fit in 64 bits")
        if required & ~offered:
            raise ConfigError(
                f"a modern device must offer the features it requires ({required:#x})"
            )
        self.offered = offered
        self.required = required
        self.status = 0
        self.driver_features = 0
        self.acked = 0

    # -- queries

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & _OK)

    @property
    def features_ok(self) -> bool:
        return bool(self.status & _F)

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & DeviceStatus.DEVICE_NEEDS_RESET)

    def has(self, bit: int) -> bool:
        """Whether feature `bit` was negotiated."""
        return bool(self.acked >> bit & 1)

    # -- feature pages (§4.1.4.3: 32 bits at a time through the select registers)

    def device_features_page(self, select: int) -> int:
        if not 0 <= select < FEATURE_PAGES:
            return 0
        return (self.offered >> (32 * select)) & _U32

    def driver_features_page(self, select: int) -> int:
        if not 0 <= select < FEATURE_PAGES:
            return 0
        return (self.driver_features >> (32 * select)) & _U32

    def write_driver_features_page(self, select: int, value: int) -> None:
        if self.features_ok or not 0 <= select < FEATURE_PAGES:
            return  # frozen after FEATURES_OK; no pages beyond 64 bits
        shift = 32 * select
        self.driver_features = (self.driver_features & ~(_U32 << shift)) | ((value & _U32) << shift)

    # -- transitions

    def accepts(self, features: int) -> bool:
        """§2.2.1 and §6.1: only offered bits, and VERSION_1 (modern) must be among them."""
        return not features & ~self.offered and features & self.required == self.required

    def write(self, value: int) -> list[StatusAction]:
        """A driver write of device_status; returns what the transport must do."""
        value &= 0xFF
        if value == 0:
            self.reset()
            return [StatusAction.RESET]
        old = self.status
        # Clearing is not the driver's to do; DEVICE_NEEDS_RESET is the device's.
        wanted = (old | value) & DRIVER_BITS
        new = old & ~DRIVER_BITS
        actions: list[StatusAction] = []
        for bit, needs, action in TRANSITIONS:
            if not wanted & bit:
                continue
            if not old & bit:
                # `new` holds the bits accepted so far, in TRANSITIONS order, so a
                # prerequisite dropped earlier in this write also drops this bit.
                if new & needs != needs:
                    continue
                if bit is _F:
                    if not self.accepts(self.driver_features):
                        continue  # §3.1.1 step 5: the driver re-reads and sees it clear
                    self.acked = self.driver_features
                if action is not None:
                    actions.append(action)
            new |= bit
        self.status = new
        return actions

    def latch_needs_reset(self) -> bool:
        """Set DEVICE_NEEDS_RESET (§2.1.2); True if it was not set before."""
        if self.needs_reset:
            return False
        self.status |= DeviceStatus.DEVICE_NEEDS_RESET
        return True

    def reset(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.acked = 0
