"""Virtio over PCI, modern interface only (virtio 1.2 §4.1 Virtio Over PCI Bus).

Layout (QEMU's virtio-pci, which Linux, SeaBIOS and our vfio-user bridge have
all driven):

    BAR4  64-bit prefetchable memory, 16 KiB
          0x0000  common configuration  (§4.1.4.3)  0x38 bytes
          0x1000  ISR status            (§4.1.4.5)  1 byte
          0x2000  device configuration  (§4.1.4.6)  the device's structure
          0x3000  notifications         (§4.1.4.4)  queue q at 0x3000 + 4q
    BAR1  32-bit memory, 4 KiB: MSI-X table at 0x000, PBA at 0x800

Why two BARs rather than crosvm's single BAR with MSI-X at 0x6000: the MSI-X
table and PBA are the one window a frontend emulates itself (QEMU's vfio-user
client traps the table page; a KVM frontend may route it to irqfds), so giving
it a BAR of its own keeps every byte of BAR4 plain device registers that can
be forwarded, or later mapped, whole. With a frontend that takes no MSI-X
(Presentation.msix False) BAR1 is simply not there and interrupts use INTx
and the ISR. No legacy I/O BAR: non-transitional device id 0x1040 + type.

Capabilities (vendor-specific, `struct virtio_pci_cap`, §4.1.4): COMMON,
NOTIFY (multiplier 4), ISR, DEVICE (when the device has a configuration
structure) and PCI_CFG, whose window turns config-space accesses into BAR4 or
BAR1 accesses (§4.1.4.9); a window with a bad bar, offset or length is ignored.

Guest misuse never raises (reliability.md C6): accesses of any width read
something defined and odd writes are ignored; queue_select past the last
queue reads 0 and takes no writes; kicks before DRIVER_OK, while
DEVICE_NEEDS_RESET, without Bus Master Enable or for an unknown or disabled
queue are dropped (§2.1.2: no buffers are used before DRIVER_OK). A ring the
driver broke latches DEVICE_NEEDS_RESET and sends a configuration interrupt;
a status write of 0 clears it.

Interrupt effects raised by a BAR or config *read* (reading ISR lowers INTx)
wait in the function until the shell's next `take_effects()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..effects import BarKind, DeviceNeedsReset, Effect
from ..errors import ConfigError
from ..pci.bars import BarSpec
from ..pci.capabilities import CapabilityList
from ..pci.function import (
    MsixLayout,
    PciFunction,
    PciIdentity,
    Presentation,
    validate_config_access,
)
from ..pci.regs import PCI_CAP_ID_VNDR
from .chain import ChainError, RingMemory
from .device import VirtioDevice
from .queue import QueueArea, QueueConfig, SplitQueue
from .spec import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_DEVICE_ID_BASE,
    VIRTIO_PCI_ISR_CONFIG,
    VIRTIO_PCI_ISR_QUEUE,
    VIRTIO_PCI_REVISION,
    VIRTIO_PCI_VENDOR_ID,
    VirtioPciCapType,
)
from .status import StatusAction, VirtioStatus

VIRTIO_BAR: Final = 4
VIRTIO_BAR_SIZE: Final = 0x4000
MSIX_BAR: Final = 1
MSIX_BAR_SIZE: Final = 0x1000
MSIX_TABLE_OFFSET: Final = 0x000
MSIX_PBA_OFFSET: Final = 0x800

COMMON_CFG_OFFSET: Final = 0x0000
COMMON_CFG_SIZE: Final = 0x38  # through queue_device; 1.2's 0x38..0x3b are not offered
ISR_CFG_OFFSET: Final = 0x1000
DEVICE_CFG_OFFSET: Final = 0x2000
DEVICE_CFG_MAX: Final = 0x1000
NOTIFY_CFG_OFFSET: Final = 0x3000
NOTIFY_OFF_MULTIPLIER: Final = 4
REGION_SIZE: Final = 0x1000

SUBSYSTEM_ID: Final = 0x1100  # §4.1.2.1: 0x40 or more; QEMU's value

# struct virtio_pci_cap field offsets (§4.1.4)
CAP_LEN: Final = 2
CAP_CFG_TYPE: Final = 3
CAP_BAR: Final = 4
CAP_ID: Final = 5
CAP_OFFSET: Final = 8
CAP_LENGTH: Final = 12
CAP_SIZE: Final = 16
NOTIFY_CAP_MULTIPLIER: Final = 16
NOTIFY_CAP_SIZE: Final = 20
PCI_CFG_CAP_DATA: Final = 16
PCI_CFG_CAP_SIZE: Final = 20

# Common configuration registers (§4.1.4.3), offset -> width. The 64-bit ring
# addresses are two 32-bit registers each, as drivers write them.
DEVICE_FEATURE_SELECT: Final = 0x00
DEVICE_FEATURE: Final = 0x04
DRIVER_FEATURE_SELECT: Final = 0x08
DRIVER_FEATURE: Final = 0x0C
CONFIG_MSIX_VECTOR: Final = 0x10
NUM_QUEUES: Final = 0x12
DEVICE_STATUS: Final = 0x14
CONFIG_GENERATION: Final = 0x15
QUEUE_SELECT: Final = 0x16
QUEUE_SIZE: Final = 0x18
QUEUE_MSIX_VECTOR: Final = 0x1A
QUEUE_ENABLE: Final = 0x1C
QUEUE_NOTIFY_OFF: Final = 0x1E
QUEUE_DESC_LO: Final = 0x20
QUEUE_DESC_HI: Final = 0x24
QUEUE_DRIVER_LO: Final = 0x28
QUEUE_DRIVER_HI: Final = 0x2C
QUEUE_DEVICE_LO: Final = 0x30
QUEUE_DEVICE_HI: Final = 0x34

COMMON_REGISTERS: Final[dict[int, int]] = {
    DEVICE_FEATURE_SELECT: 4,
    DEVICE_FEATURE: 4,
    DRIVER_FEATURE_SELECT: 4,
    DRIVER_FEATURE: 4,
    CONFIG_MSIX_VECTOR: 2,
    NUM_QUEUES: 2,
    DEVICE_STATUS: 1,
    CONFIG_GENERATION: 1,
    QUEUE_SELECT: 2,
    QUEUE_SIZE: 2,
    QUEUE_MSIX_VECTOR: 2,
    QUEUE_ENABLE: 2,
    QUEUE_NOTIFY_OFF: 2,
    QUEUE_DESC_LO: 4,
    QUEUE_DESC_HI: 4,
    QUEUE_DRIVER_LO: 4,
    QUEUE_DRIVER_HI: 4,
    QUEUE_DEVICE_LO: 4,
    QUEUE_DEVICE_HI: 4,
}
# byte offset -> the register holding it, for reads of any width and alignment
_REGISTER_OF_BYTE: Final = {
    start + i: start for start, width in COMMON_REGISTERS.items() for i in range(width)
}
_ADDRESS_REGISTERS: Final = {
    QUEUE_DESC_LO: (QueueArea.DESC, 0),
    QUEUE_DESC_HI: (QueueArea.DESC, 32),
    QUEUE_DRIVER_LO: (QueueArea.DRIVER, 0),
    QUEUE_DRIVER_HI: (QueueArea.DRIVER, 32),
    QUEUE_DEVICE_LO: (QueueArea.DEVICE, 0),
    QUEUE_DEVICE_HI: (QueueArea.DEVICE, 32),
}


@dataclass(frozen=True, slots=True)
class VirtioCap:
    """Where one vendor capability sits in config space, and what it points at."""

    cfg_type: VirtioPciCapType
    cap_offset: int
    bar: int
    offset: int
    length: int


class VirtioPciFunction(PciFunction):
    """A virtio device on the PCI bus (the transport; the device is `self.device`)."""

    type_name = "virtio-pci"

    def __init__(
        self,
        device: VirtioDevice,
        *,
        presentation: Presentation = Presentation(),
        serial: int = 0,
        memory: RingMemory | None = None,
    ) -> None:
        if not 1 <= device.device_type <= 0x3F:
            raise ConfigError(f"virtio device type {device.device_type} is not 1..63")
        if not 1 <= len(device.queue_max_sizes) <= 0xFFFF:
            raise ConfigError("a virtio device needs 1..65535 queues")
        # State add_capabilities needs exists before the base class builds config space.
        self.device = device
        self.type_name = device.type_name
        self.caps: dict[VirtioPciCapType, VirtioCap] = {}
        self.memory = memory
        self.status = VirtioStatus(device.avail_features)
        self.queue_configs = [QueueConfig(size) for size in device.queue_max_sizes]
        self.queues: dict[int, SplitQueue] = {}
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.config_generation = 0
        self.queue_select = 0
        self.isr = 0
        self.needs_reset_reason = ""
        self.pending_work: set[int] = set()  # queues whose notify() ran out of budget
        bars = [BarSpec(VIRTIO_BAR, BarKind.MEM64, VIRTIO_BAR_SIZE, prefetchable=True)]
        msix: MsixLayout | None = None
        if presentation.msix:
            bars.append(BarSpec(MSIX_BAR, BarKind.MEM32, MSIX_BAR_SIZE))
            # One vector per queue plus one for configuration changes.
            vectors = min(len(self.queue_configs) + 1, 2048)
            msix = MsixLayout(vectors, MSIX_BAR, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET)
        super().__init__(
            PciIdentity(
                vendor_id=VIRTIO_PCI_VENDOR_ID,
                device_id=VIRTIO_PCI_DEVICE_ID_BASE + device.device_type,
                class_code=device.pci_class_code,
                revision=VIRTIO_PCI_REVISION,
                subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
                subsystem_id=SUBSYSTEM_ID,
            ),
            bars,
            presentation=presentation,
            msix=msix,
            serial=serial,
        )

    @property
    def num_queues(self) -> int:
        return len(self.queue_configs)

    def attach_memory(self, memory: RingMemory | None) -> None:
        """The shell's guest memory: shared RAM or DMA by message, the same to the
        queues (None when the frontend gives no access to guest memory)."""
        self.memory = memory

    # -- capabilities

    def add_capabilities(self, caps: CapabilityList) -> None:
        device_cfg_len = min(len(self.device.config_bytes()), DEVICE_CFG_MAX)
        layout = [
            (VirtioPciCapType.VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_SIZE),
            (
                VirtioPciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_CFG_OFFSET,
                NOTIFY_OFF_MULTIPLIER * len(self.queue_configs),
            ),
            (VirtioPciCapType.VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, 1),
        ]
        if device_cfg_len:
            layout.append(
                (VirtioPciCapType.VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, device_cfg_len)
            )
        for cfg_type, offset, length in layout:
            self._add_vendor_cap(caps, cfg_type, VIRTIO_BAR, offset, length)
        # §4.1.4.9: bar, offset and length are the driver's to write; data is the window.
        pci_cfg = self._add_vendor_cap(caps, VirtioPciCapType.VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0)
        at = pci_cfg.cap_offset
        self.cs.set_writable(at + CAP_BAR, 1, 0xFF)
        self.cs.set_writable(at + CAP_OFFSET, 4, 0xFFFF_FFFF)
        self.cs.set_writable(at + CAP_LENGTH, 4, 0xFFFF_FFFF)
        self.cs.set_writable(at + PCI_CFG_CAP_DATA, 4, 0xFFFF_FFFF)

    def _add_vendor_cap(
        self, caps: CapabilityList, cfg_type: VirtioPciCapType, bar: int, offset: int, length: int
    ) -> VirtioCap:
        size = {
            VirtioPciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG: NOTIFY_CAP_SIZE,
            VirtioPciCapType.VIRTIO_PCI_CAP_PCI_CFG: PCI_CFG_CAP_SIZE,
        }.get(cfg_type, CAP_SIZE)
        at = caps.add(PCI_CAP_ID_VNDR, size)
        self.cs.set(at + CAP_LEN, 1, size)
        self.cs.set(at + CAP_CFG_TYPE, 1, cfg_type)
        self.cs.set(at + CAP_BAR, 1, bar)
        self.cs.set(at + CAP_ID, 1, 0)
        self.cs.set(at + CAP_OFFSET, 4, offset)
        self.cs.set(at + CAP_LENGTH, 4, length)
        if cfg_type is VirtioPciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG:
            self.cs.set(at + NOTIFY_CAP_MULTIPLIER, 4, NOTIFY_OFF_MULTIPLIER)
        cap = VirtioCap(cfg_type, at, bar, offset, length)
        self.caps[cfg_type] = cap
        return cap

    # -- the PCI_CFG window (§4.1.4.9)

    def _pci_cfg_data(self, offset: int, size: int) -> bool:
        at = self.caps[VirtioPciCapType.VIRTIO_PCI_CAP_PCI_CFG].cap_offset + PCI_CFG_CAP_DATA
        return offset < at + 4 and at < offset + size

    def _pci_cfg_window(self) -> tuple[int, int, int] | None:
        """(bar, offset, length) the window points at, or None if the driver set
        up something no BAR access could be (ignored, as the spec lets us)."""
        at = self.caps[VirtioPciCapType.VIRTIO_PCI_CAP_PCI_CFG].cap_offset
        bar = self.cs.get(at + CAP_BAR, 1)
        offset = self.cs.get(at + CAP_OFFSET, 4)
        length = self.cs.get(at + CAP_LENGTH, 4)
        spec = self.bars.specs.get(bar)
        if spec is None or spec.kind is BarKind.ROM or length not in (1, 2, 4):
            return None
        if offset % length or offset + length > spec.size:
            return None
        return bar, offset, length

    def config_read(self, offset: int, size: int) -> int:
        validate_config_access(offset, size, self.cs.size)  # before any BAR side effect
        if self._pci_cfg_data(offset, size):
            window = self._pci_cfg_window()
            at = self.caps[VirtioPciCapType.VIRTIO_PCI_CAP_PCI_CFG].cap_offset
            value = 0
            if window is not None:
                bar, bar_offset, length = window
                value = self.bar_read(bar, bar_offset, length)
            self.cs.set(at + PCI_CFG_CAP_DATA, 4, value)
        return super().config_read(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        if not self._pci_cfg_data(offset, size):
            return
        window = self._pci_cfg_window()
        if window is None:
            return
        bar, bar_offset, length = window
        at = self.caps[VirtioPciCapType.VIRTIO_PCI_CAP_PCI_CFG].cap_offset
        value = self.cs.get(at + PCI_CFG_CAP_DATA, length)
        # The window was checked to fit its BAR, so this access is a valid one; the
        # effects it causes leave with this config write's.
        self._effects.extend(self.bar_write(bar, bar_offset, length, value))

    # -- BAR4

    def read_bar(self, bar: int, offset: int, size: int) -> int:
        if bar != VIRTIO_BAR:
            return 0
        region, at = divmod(offset, REGION_SIZE)
        base = region * REGION_SIZE
        if at + size > REGION_SIZE:
            return 0  # straddles two regions: no register does that
        match base:
            case 0x0000:
                return self._common_read(at, size)
            case 0x1000:
                return self._isr_read() if at == 0 else 0
            case 0x2000:
                return self.device.read_config(at, size) & ((1 << (8 * size)) - 1)
            case _:
                return 0  # notify region and unused space read 0

    def write_bar(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != VIRTIO_BAR:
            return
        region, at = divmod(offset, REGION_SIZE)
        if at + size > REGION_SIZE:
            return
        match region * REGION_SIZE:
            case 0x0000:
                self._common_write(at, size, value)
            case 0x2000:
                self.device.write_config(at, size, value)
            case 0x3000:
                self._notify_write(at)
            case _:
                pass  # ISR is read-only

    # -- where the shell may serve an access

    def access_may_block(self, bar: int, offset: int, write: bool) -> bool:
        """Whether a BAR access can run the device rather than only the
        transport, so a shell must not serve it on its event loop: a notify
        write (queue work: backend I/O, guest memory, which in DMA-messages
        mode waits for the frontend) and a device_status write (the device's
        activate and reset hooks). Reads, the rest of common configuration,
        ISR, device configuration (VirtioDevice.write_config only keeps fields)
        and the MSI-X table and PBA (BAR1) move transport state only. Decided
        from the layout alone; an access the function would refuse or ignore
        may answer either way."""
        if not write or bar != VIRTIO_BAR:
            return False
        if offset // REGION_SIZE == NOTIFY_CFG_OFFSET // REGION_SIZE:
            return True
        return offset == COMMON_CFG_OFFSET + DEVICE_STATUS  # only a 1-byte write lands

    def config_access_may_block(self, offset: int, size: int, write: bool) -> bool:
        """The same for a config-space access: only a write of the PCI_CFG
        window's data reaches a BAR (§4.1.4.9), and blocks where that BAR
        access would."""
        if not write or not self._pci_cfg_data(offset, size):
            return False
        window = self._pci_cfg_window()
        return window is not None and self.access_may_block(window[0], window[1], write=True)

    # -- common configuration

    def _selected(self) -> QueueConfig | None:
        if 0 <= self.queue_select < len(self.queue_configs):
            return self.queue_configs[self.queue_select]
        return None  # C6: out of range reads 0, takes no writes

    def _common_register(self, register: int) -> int:
        q = self._selected()
        match register:
            case 0x00:
                return self.device_feature_select
            case 0x04:
                return self.status.device_features_page(self.device_feature_select)
            case 0x08:
                return self.driver_feature_select
            case 0x0C:
                return self.status.driver_features_page(self.driver_feature_select)
            case 0x10:
                return self.config_msix_vector
            case 0x12:
                return self.num_queues
            case 0x14:
                return self.status.status
            case 0x15:
                return self.config_generation
            case 0x16:
                return self.queue_select
        if q is None:
            return 0
        match register:
            case 0x18:
                return q.size
            case 0x1A:
                return q.msix_vector
            case 0x1C:
                return int(q.enabled)
            case 0x1E:
                return self.queue_select  # notify_off = index: each queue its own dword
        if register in _ADDRESS_REGISTERS:
            area, shift = _ADDRESS_REGISTERS[register]
            return (q.address(area) >> shift) & 0xFFFF_FFFF
        return 0

    def _common_read(self, offset: int, size: int) -> int:
        # Byte by byte, so any width and alignment reads what the bytes hold.
        value = 0
        cache: dict[int, int] = {}
        for i in range(size):
            at = offset + i
            register = _REGISTER_OF_BYTE.get(at)
            if register is None:
                continue
            if register not in cache:
                cache[register] = self._common_register(register)
            byte = cache[register] >> (8 * (at - register)) & 0xFF
            value |= byte << (8 * i)
        return value

    def _common_write(self, offset: int, size: int, value: int) -> None:
        if size == 8 and offset in (QUEUE_DESC_LO, QUEUE_DRIVER_LO, QUEUE_DEVICE_LO):
            self._common_write(offset, 4, value & 0xFFFF_FFFF)
            self._common_write(offset + 4, 4, value >> 32)
            return
        if COMMON_REGISTERS.get(offset) != size:
            return  # partial or spanning writes of a register are ignored (defined, C6)
        q = self._selected()
        match offset:
            case 0x00:
                self.device_feature_select = value
            case 0x08:
                self.driver_feature_select = value
            case 0x0C:
                self.status.write_driver_features_page(self.driver_feature_select, value)
            case 0x10:
                self.config_msix_vector = self._vector(value)
            case 0x14:
                self._status_write(value)
            case 0x16:
                self.queue_select = value
            case 0x18 if q is not None:
                q.set_size(value)
            case 0x1A if q is not None:
                q.msix_vector = self._vector(value)
            case 0x1C if q is not None and value == 1:
                # §4.1.4.3.2: writing 0 is not the driver's to do (no RING_RESET)
                q.enable()
            case _ if q is not None and offset in _ADDRESS_REGISTERS:
                area, shift = _ADDRESS_REGISTERS[offset]
                q.set_address(area, value, shift=shift, width=32)
            case _:
                pass  # read-only registers, or queue registers with no queue selected

    def _vector(self, value: int) -> int:
        """A vector the driver asks for, or NO_VECTOR to refuse it (Linux reads back)."""
        if self.msix is not None and 0 <= value < self.msix.vectors:
            return value
        return VIRTIO_MSI_NO_VECTOR

    # -- status

    def _status_write(self, value: int) -> None:
        for action in self.status.write(value):
            if action is StatusAction.RESET:
                self._virtio_reset()
            elif action is StatusAction.ACTIVATE:
                self._activate()

    def _activate(self) -> None:
        memory = self.memory
        if memory is None:
            self.needs_reset("no guest memory to run virtqueues in (memory mode NONE)")
            return
        acked = self.status.acked
        queues = {
            i: SplitQueue(
                i,
                config,
                memory,
                event_idx=self.status.has(VIRTIO_F_RING_EVENT_IDX),
                indirect=self.status.has(VIRTIO_F_RING_INDIRECT_DESC),
                on_error=self.needs_reset,
            )
            for i, config in enumerate(self.queue_configs)
            if config.enabled
        }
        if self.status.needs_reset:
            return  # a queue's rings are not in RAM: latched already
        self.queues = queues
        self.device.activate(queues, memory, self, acked)

    def _virtio_reset(self) -> None:
        """§4.1.4.3.2: device_status 0 resets the device; everything reads as new."""
        self.device.reset()
        for config in self.queue_configs:
            config.reset()
        self.queues = {}
        self.pending_work.clear()
        self.device_feature_select = self.driver_feature_select = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.needs_reset_reason = ""
        if self.isr:
            self.isr = 0
            self.set_intx(False)

    def needs_reset(self, reason: str) -> None:
        """The device hit an error only a reset cures (§2.1.2): latch
        DEVICE_NEEDS_RESET, stop every queue, tell the driver by a config interrupt."""
        if not self.status.latch_needs_reset():
            return
        self.needs_reset_reason = reason
        self._effects.append(DeviceNeedsReset(self.device_id, reason))
        for queue in self.queues.values():
            queue.fail("the device needs a reset")
        self.pending_work.clear()
        if self.status.driver_ok:
            self.signal_config()

    # -- notifications (§4.1.4.4)

    def _notify_write(self, offset: int) -> None:
        index, rest = divmod(offset, NOTIFY_OFF_MULTIPLIER)
        if rest or not 0 <= index < self.num_queues:
            return
        self.kick(index)

    def kick(self, index: int) -> None:
        """A driver notification for queue `index` (also the shell's ioeventfd path)."""
        if not self.status.driver_ok or self.status.needs_reset or not self.bus_master:
            return
        if index not in self.queues:
            return
        try:
            more = self.device.notify(index)
        except ChainError as e:
            # A device's Reader/Writer met guest memory that changed under it
            # (a region gone, read-only RAM): the guest's doing, so NEEDS_RESET.
            self.needs_reset(str(e))
            return
        if more:
            self.pending_work.add(index)
        else:
            self.pending_work.discard(index)

    def run_pending(self) -> list[Effect]:
        """Give each queue that ran out of budget another turn; returns the effects."""
        for index in sorted(self.pending_work):
            self.kick(index)
        return self.take_effects()

    # -- interrupts (VirtioInterrupt)

    def signal_used(self, queue_index: int) -> None:
        config = self.queue_configs[queue_index] if queue_index < self.num_queues else None
        if config is None:
            return
        self._interrupt(config.msix_vector, VIRTIO_PCI_ISR_QUEUE)

    def signal_config(self) -> None:
        self._interrupt(self.config_msix_vector, VIRTIO_PCI_ISR_CONFIG)

    def config_changed(self) -> None:
        """The device changed its configuration structure (§4.1.4.3: generation)."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.status.driver_ok:
            self.signal_config()

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix is not None and self.msix.enabled:
            if vector != VIRTIO_MSI_NO_VECTOR:
                self.signal(vector)
            return  # §4.1.5.1.2: with MSI-X on and no vector, no interrupt
        self.isr |= isr_bit
        self.set_intx(True)

    def _isr_read(self) -> int:
        """§4.1.4.5: reading ISR returns and clears it, and de-asserts INTx."""
        value, self.isr = self.isr, 0
        if value:
            self.set_intx(False)
        return value

    # -- function reset

    def on_reset(self) -> None:
        self.status.reset()
        self._virtio_reset()
