"""BAR arbitration as a state machine: random config traffic on three devices.

The machine plays a frontend: it applies every BarDecodeChanged to its own
routing table and never looks at the bus's internals to do so. After every
step the table must equal what the bus says decodes, and what decodes must be
what the registers program, minus exactly the BARs other BARs shadow.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from devserver.devices.testdev import IO_BAR, MEM_BAR
from devserver.effects import AddressRange, Effect
from devserver.pci.bus import BarKey
from tests.strategies import (
    ALL_BAR_REGISTERS,
    BAR_REGISTER,
    bar_address_writes,
    bar_events,
    bar_values,
    cfg_read,
    cfg_write,
    command_values,
    config_writes,
    high_dword_values,
    io_bases,
    is_io,
    make_bus,
    mem_bases,
    overlapping_pairs,
    replay,
    set_command,
)

DEVICES = 3
HIGH_DWORD = BAR_REGISTER[MEM_BAR] + 4

slots = st.integers(1, DEVICES)
low_bar_registers = st.sampled_from([r for r in ALL_BAR_REGISTERS if r != HIGH_DWORD])


# About 5 s on 2 cores; at this size it finds a transient mis-activation
# (since fixed in PciBus._arbitrate) with most seeds, and with the CI one.
@settings(max_examples=400, stateful_step_count=50)
class BarArbitration(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bus = make_bus(DEVICES)
        self.routing: dict[BarKey, AddressRange] = {}
        self.generation = 0

    def apply(self, effects: list[Effect]) -> None:
        """Take in the effects of ONE config access (the checks below are per access)."""
        events = bar_events(effects)
        # Generations count every decode change on the bus, one by one.
        for event in events:
            self.generation += 1
            assert event.generation == self.generation
        replay(self.bus, self.routing, effects)
        # A BAR only ever starts decoding at what its registers now program:
        # no transient activation of a range the guest has already left.
        for event in events:
            if event.new is not None:
                programmed = self.bus.function(event.device_id).decoded().get(event.bar)
                assert programmed == event.new, f"{event} but registers program {programmed}"

    # -- rules: what a guest (or Linux's resource assignment) does

    @rule(slot=slots, bar=st.sampled_from(sorted(BAR_REGISTER)), data=st.data())
    def place_bar(self, slot: int, bar: int, data: st.DataObject) -> None:
        # As Linux assigns a resource: a colliding base, whole BAR at once.
        base = data.draw(io_bases if bar == IO_BAR else mem_bases)
        for register, value in bar_address_writes(self.bus, slot, bar, base):
            self.apply(cfg_write(self.bus, slot, register, 4, value))

    @rule(slot=slots, register=low_bar_registers, value=bar_values)
    def write_bar(self, slot: int, register: int, value: int) -> None:
        self.apply(cfg_write(self.bus, slot, register, 4, value))

    @rule(slot=slots, value=high_dword_values)
    def write_high_dword(self, slot: int, value: int) -> None:
        self.apply(cfg_write(self.bus, slot, HIGH_DWORD, 4, value))

    @rule(
        slot=slots,
        register=st.sampled_from(ALL_BAR_REGISTERS),
        size=st.sampled_from((1, 2)),
        index=st.integers(0, 3),
        value=st.integers(0, 0xFFFF),
    )
    def write_bar_partially(
        self, slot: int, register: int, size: int, index: int, value: int
    ) -> None:
        offset = register + (index & ~(size - 1))
        self.apply(cfg_write(self.bus, slot, offset, size, value & ((1 << (8 * size)) - 1)))

    @rule(slot=slots, register=st.sampled_from(ALL_BAR_REGISTERS))
    def size_and_restore(self, slot: int, register: int) -> None:
        saved = cfg_read(self.bus, slot, register, 4)
        self.apply(cfg_write(self.bus, slot, register, 4, 0xFFFF_FFFF))
        self.apply(cfg_write(self.bus, slot, register, 4, saved))

    @rule(slot=slots, command=command_values)
    def write_command(self, slot: int, command: int) -> None:
        self.apply(set_command(self.bus, slot, command))

    @rule(slot=slots, access=st.one_of(config_writes(limit=0x40), config_writes()))
    def write_anywhere(self, slot: int, access: tuple[int, int, int]) -> None:
        offset, size, value = access
        self.apply(cfg_write(self.bus, slot, offset, size, value))

    @rule(slot=slots)
    def reset(self, slot: int) -> None:
        self.apply(self.bus.reset(slot))

    # -- invariants

    @invariant()
    def routing_matches_the_bus(self) -> None:
        assert self.routing == self.bus.decoding()
        assert self.bus.generation == self.generation

    @invariant()
    def nothing_decoding_overlaps_in_one_space(self) -> None:
        assert overlapping_pairs(self.bus, self.bus.decoding()) == []

    @invariant()
    def decoding_is_what_the_registers_program(self) -> None:
        for key, decoded in self.bus.decoding().items():
            assert self.bus.function(key.device_id).decoded().get(key.bar) == decoded

    @invariant()
    def unshadowed_bars_decode(self) -> None:
        programmed = {
            BarKey(slot, bar): decoded
            for slot, function in self.bus
            for bar, decoded in function.decoded().items()
        }
        decoding = self.bus.decoding()
        for key, decoded in programmed.items():
            shadowed = any(
                other != key
                and is_io(self.bus, other) == is_io(self.bus, key)
                and decoded.overlaps(rival)
                for other, rival in programmed.items()
            )
            assert shadowed or key in decoding, f"{key} at {decoded} overlaps nothing yet is off"


TestBarArbitration = BarArbitration.TestCase
