"""INTx: PCI interrupt pins onto the in-kernel IOAPIC's GSIs (pure; no I/O).

A PCI function drives one of four level-triggered, active-low, wire-ORed
pins (INTA#..INTD#). On a host bridge the slot rotates them onto four
interrupt lines ("swizzle", PCI-to-PCI Bridge spec 1.2 §9.1), which this VMM
wires to IOAPIC inputs 16..19 (the first ones no ISA IRQ uses, as QEMU's q35
PIRQs). The guest learns the routing from the MP table (linux.build_mptable,
one MP_INTSRC per function: source bus IRQ `slot << 2 | pin - 1`), or, for
the freestanding test program, computes it the same way.

Several functions may share a line: the line is asserted while any of them
asserts, so the router keeps who asserts each GSI and reports only changes of
the ORed level (KVM_IRQ_LINE gets transitions, not every device event).
KVM_IRQ_LINE takes the logical level: 1 = asserted whatever the polarity the
guest programmed into the IOAPIC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PCI_GSI_BASE: Final = 16
PCI_GSI_COUNT: Final = 4  # one per swizzled line: GSIs 16..19


def swizzle_gsi(slot: int, pin: int) -> int:
    """The GSI of `pin` (1 = INTA# .. 4 = INTD#) of the function in `slot` on bus 0."""
    if not 0 <= slot < 32:
        raise ValueError(f"PCI slot {slot} is not 0..31")
    if not 1 <= pin <= 4:
        raise ValueError(f"interrupt pin {pin} is not 1..4 (INTA#..INTD#)")
    return PCI_GSI_BASE + (slot + pin - 1) % PCI_GSI_COUNT


@dataclass(frozen=True, slots=True)
class IntxSource:
    """A function's INTx wiring: where it sits and which pin it drives."""

    device_id: int
    slot: int
    pin: int

    @property
    def gsi(self) -> int:
        return swizzle_gsi(self.slot, self.pin)

    @property
    def mp_source_irq(self) -> int:
        """The MP table's source bus IRQ for a PCI interrupt (MP spec 1.4, §D.3)."""
        return self.slot << 2 | (self.pin - 1)


class IntxRouter:
    """Device INTx levels in, ORed GSI levels out (only when a line changes)."""

    def __init__(self, sources: list[IntxSource] | None = None) -> None:
        self._sources: dict[int, IntxSource] = {}
        self._asserting: dict[int, set[int]] = {}  # GSI -> device ids holding it high
        for source in sources or ():
            self.add(source)

    def add(self, source: IntxSource) -> None:
        swizzle_gsi(source.slot, source.pin)  # a bad slot or pin fails now, not at an interrupt
        self._sources[source.device_id] = source

    @property
    def sources(self) -> list[IntxSource]:
        return sorted(self._sources.values(), key=lambda s: (s.slot, s.pin))

    def gsi_of(self, device_id: int) -> int | None:
        source = self._sources.get(device_id)
        return source.gsi if source is not None else None

    def change(self, device_id: int, asserted: bool) -> tuple[int, bool] | None:
        """A device's pin changed; returns (GSI, new line level) if the line changed.

        An unknown device (no pin, or not on this bus) changes nothing: the
        server only reports pins it presented, so this is a stale event.
        """
        source = self._sources.get(device_id)
        if source is None:
            return None
        holders = self._asserting.setdefault(source.gsi, set())
        before = bool(holders)
        if asserted:
            holders.add(device_id)
        else:
            holders.discard(device_id)
        after = bool(holders)
        return (source.gsi, after) if after != before else None

    def level(self, gsi: int) -> bool:
        return bool(self._asserting.get(gsi))
