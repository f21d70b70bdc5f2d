"""Hypothesis state machine: status writes x queue operations x hostile rings
(reliability.md §6 "status-machine abuse" and "chaos"; rust-vmm's virtio_queue
fuzz target has the same shape). Invariants: nothing raises, the status stays a
legal one, a live device answers every valid request, a device that needs a
reset writes nothing to its used rings."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from devserver.pci.regs import PCI_COMMAND
from devserver.virtio.spec import VIRTQ_DESC_F_NEXT, DeviceStatus
from devserver.virtio.status import TRANSITIONS
from tests.unit.virtio.driver import STANDARD_FEATURES, make

A, D, F, OK = (
    DeviceStatus.ACKNOWLEDGE,
    DeviceStatus.DRIVER,
    DeviceStatus.FEATURES_OK,
    DeviceStatus.DRIVER_OK,
)
NR = DeviceStatus.DEVICE_NEEDS_RESET
STATUS_VALUES = st.one_of(
    st.sampled_from([0, A, A | D, A | D | F, A | D | F | OK, DeviceStatus.FAILED, NR]),
    st.integers(0, 255),
)
QUEUES = st.integers(0, 1)


class VirtioMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fn, self.drv, self.dev = make()
        self.drv.enable_bus_master()

    def live(self, q: int) -> bool:
        s = self.fn.status
        return s.driver_ok and not s.needs_reset and q in self.fn.queues and self.fn.bus_master

    @rule(value=STATUS_VALUES)
    def write_status(self, value: int) -> None:
        self.drv.set_status(value)
        if value == 0:
            self.drv.queues.clear()  # the device forgot them; so does the driver

    @rule(msix=st.booleans())
    def linux_probe(self, msix: bool) -> None:
        """The whole of a driver's probe: reset, handshake, MSI-X, two queues, DRIVER_OK."""
        self.drv.queues.clear()
        self.drv.start(queues=2, msix=msix)
        assert self.live(0) and self.live(1)

    @rule(features=st.sampled_from([STANDARD_FEATURES, 1 << 32, 0, STANDARD_FEATURES | 1 << 3]))
    def write_features(self, features: int) -> None:
        self.drv.set_driver_features(features)

    @rule(q=QUEUES)
    def setup_queue(self, q: int) -> None:
        if q not in self.drv.queues:
            self.drv.setup_queue(q, vector=q + 1)

    @rule()
    def toggle_bus_master(self) -> None:
        self.drv.cfg_write(PCI_COMMAND, 2, self.drv.cfg_read(PCI_COMMAND, 2) ^ 0x4)

    @rule(q=QUEUES, data=st.binary(min_size=1, max_size=8))
    @precondition(lambda self: bool(self.drv.queues))
    def valid_request(self, q: int, data: bytes) -> None:
        if q not in self.drv.queues:
            return
        was_broken = self.fn.status.needs_reset
        before = self.drv.used_idx(q)
        head, dst = self.drv.add_request(q, data, len(data))
        self.drv.publish(q, head)
        self.drv.kick(q)
        after = self.drv.used_idx(q)
        if was_broken:
            assert after == before
        elif self.live(q):
            assert after == self.drv.queues[q].avail_idx
            assert self.drv.get(dst, len(data)) == data

    @rule(q=QUEUES, kind=st.sampled_from(["loop", "head", "jump", "oob"]))
    @precondition(lambda self: bool(self.drv.queues))
    def hostile_request(self, q: int, kind: str) -> None:
        layout = self.drv.queues.get(q)
        if layout is None:
            return
        was_broken = self.fn.status.needs_reset
        before = self.drv.used_idx(q)
        earlier = (layout.avail_idx - before) & 0xFFFF  # published, not yet used
        head = layout.next_desc
        layout.next_desc = (head + 1) % layout.size
        if kind == "loop":
            self.drv.put_desc(q, head, 0x8000, 4, VIRTQ_DESC_F_NEXT, head)
        elif kind == "oob":
            self.drv.put_desc(q, head, 1 << 40, 4)
        if kind == "head":
            head = layout.size + 3
        if kind == "jump":
            self.drv.set_avail_idx(q, layout.avail_idx + layout.size + 1)
        else:
            self.drv.publish(q, head)
        live = self.live(q)
        self.drv.kick(q)
        if was_broken:
            assert self.drv.used_idx(q) == before
        if live:
            # Requests published while the device could not run them may go first;
            # the hostile one is never completed and breaks the device.
            assert (self.drv.used_idx(q) - before) & 0xFFFF <= earlier
            assert self.fn.status.needs_reset

    @rule(q=st.integers(0, 0x400))
    def stray_kick(self, q: int) -> None:
        self.drv.write(0x3000 + 4 * (q % 0x400), 2, q)

    @invariant()
    def status_is_legal(self) -> None:
        status = self.drv.status
        for bit, needs, _ in TRANSITIONS:
            assert not status & bit or status & needs == needs
        if status & F:
            assert self.fn.status.acked & ~self.dev.avail_features == 0

    @invariant()
    def effects_drain(self) -> None:
        self.drv.take()


VirtioMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30)
TestVirtioMachine = VirtioMachine.TestCase
