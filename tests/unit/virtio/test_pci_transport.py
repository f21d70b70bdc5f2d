"""The modern virtio-pci transport driven like a guest (reliability.md C6, C8 and
the §6 matrix rows on kicks, queue_select, odd widths, the PCI_CFG window,
status abuse and NEEDS_RESET)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devserver.effects import BarKind, DeviceNeedsReset, IntxChanged, MsiRaised
from devserver.errors import ConfigError
from devserver.pci.function import Presentation
from devserver.pci.regs import PCI_CAP_ID_VNDR, PCI_CAPABILITY_LIST, PCI_COMMAND
from devserver.virtio.device import QUEUE_WEIGHT
from devserver.virtio.pci_transport import (
    CAP_BAR,
    CAP_CFG_TYPE,
    CAP_LENGTH,
    CAP_OFFSET,
    COMMON_CFG_SIZE,
    CONFIG_GENERATION,
    CONFIG_MSIX_VECTOR,
    DEVICE_CFG_OFFSET,
    DEVICE_STATUS,
    MSIX_BAR,
    NOTIFY_CAP_MULTIPLIER,
    NUM_QUEUES,
    PCI_CFG_CAP_DATA,
    QUEUE_DESC_HI,
    QUEUE_DESC_LO,
    QUEUE_ENABLE,
    QUEUE_MSIX_VECTOR,
    QUEUE_NOTIFY_OFF,
    QUEUE_SELECT,
    QUEUE_SIZE,
    VIRTIO_BAR,
    VIRTIO_BAR_SIZE,
    VirtioPciFunction,
)
from devserver.virtio.ring import DESC
from devserver.virtio.spec import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTQ_DESC_F_NEXT,
    DeviceStatus,
    VirtioPciCapType,
)
from tests.unit.virtio.driver import (
    ECHO_DEVICE_TYPE,
    ECHO_MAGIC,
    EchoDevice,
    FakeVirtioDriver,
    make,
)

A, D, F, OK = (
    DeviceStatus.ACKNOWLEDGE,
    DeviceStatus.DRIVER,
    DeviceStatus.FEATURES_OK,
    DeviceStatus.DRIVER_OK,
)


def echo(drv: FakeVirtioDriver, data: bytes = b"ping", q: int = 0) -> int:
    """Queue an echo request and kick; returns the reply buffer's address."""
    head, dst = drv.add_request(q, data, len(data))
    drv.publish(q, head)
    drv.kick(q)
    return dst


def vendor_caps(drv: FakeVirtioDriver) -> dict[int, int]:
    """cfg_type -> config offset, walking the capability list as Linux does."""
    found: dict[int, int] = {}
    at = drv.cfg_read(PCI_CAPABILITY_LIST, 1)
    for _ in range(48):  # the list must end well before this
        if at == 0:
            return found
        if drv.cfg_read(at, 1) == PCI_CAP_ID_VNDR:
            found[drv.cfg_read(at + CAP_CFG_TYPE, 1)] = at
        at = drv.cfg_read(at + 1, 1)
    raise AssertionError("capability list does not end")


# -- identity and layout


def test_identity_bars_and_capabilities() -> None:
    fn, drv, _dev = make()
    assert drv.cfg_read(0, 2) == 0x1AF4 and drv.cfg_read(2, 2) == 0x1040 + ECHO_DEVICE_TYPE
    assert drv.cfg_read(8, 1) == 1  # revision 1: modern
    assert drv.cfg_read(0x2C, 2) == 0x1AF4 and drv.cfg_read(0x2E, 2) >= 0x40
    bar = fn.bar_spec(VIRTIO_BAR)
    assert (bar.kind, bar.size, bar.prefetchable) == (BarKind.MEM64, VIRTIO_BAR_SIZE, True)
    assert fn.bar_spec(MSIX_BAR).kind is BarKind.MEM32
    caps = vendor_caps(drv)
    expect = {
        VirtioPciCapType.VIRTIO_PCI_CAP_COMMON_CFG: (0x0000, COMMON_CFG_SIZE),
        VirtioPciCapType.VIRTIO_PCI_CAP_ISR_CFG: (0x1000, 1),
        VirtioPciCapType.VIRTIO_PCI_CAP_DEVICE_CFG: (0x2000, 8),
        VirtioPciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG: (0x3000, 8),
    }
    for cfg_type, (offset, length) in expect.items():
        at = caps[cfg_type]
        assert drv.cfg_read(at + CAP_BAR, 1) == VIRTIO_BAR
        assert drv.cfg_read(at + CAP_OFFSET, 4) == offset
        assert drv.cfg_read(at + CAP_LENGTH, 4) == length
    notify = caps[VirtioPciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG]
    assert drv.cfg_read(notify + NOTIFY_CAP_MULTIPLIER, 4) == 4
    assert VirtioPciCapType.VIRTIO_PCI_CAP_PCI_CFG in caps
    assert drv.read(NUM_QUEUES, 2) == 2


def test_without_msix_there_is_no_msix_bar() -> None:
    fn, _, _ = make(msix=False)
    assert fn.msix is None and MSIX_BAR not in fn.bars.specs


@pytest.mark.parametrize("queues", [(), (16, 12), (1 << 16,)])
def test_a_device_with_impossible_queues_is_a_config_error(queues: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError):
        VirtioPciFunction(EchoDevice(queue_max_sizes=queues))


def test_32bit_frontends_get_a_32bit_bar() -> None:
    fn = VirtioPciFunction(EchoDevice(), presentation=Presentation(bar64=False))
    assert fn.bar_spec(VIRTIO_BAR).kind is BarKind.MEM32


# -- end to end


def test_echo_with_msix() -> None:
    _, drv, _ = make()
    drv.start(queues=2)
    dst = echo(drv, b"hello")
    assert drv.used(0) == [(0, 5)] and drv.get(dst, 5) == b"hello"
    assert [e for e in drv.take() if isinstance(e, MsiRaised)] == [
        MsiRaised(3, 1, 0xFEE0_0000, 0x41)
    ]


def test_echo_with_intx_and_isr() -> None:
    _, drv, _ = make(msix=False)
    drv.start(msix=False)
    echo(drv)
    assert drv.used(0) == [(0, 4)]
    assert drv.take() == [IntxChanged(3, 1, True)]
    assert drv.isr() == 1  # read-to-clear (§4.1.4.5) ...
    assert drv.take() == [IntxChanged(3, 1, False)]  # ... and INTx drops
    assert drv.isr() == 0


def test_echo_with_indirect_and_event_idx() -> None:
    _, drv, _ = make()
    drv.start()
    src, dst, table = drv.alloc(4), drv.alloc(4), drv.alloc(32)
    drv.put(src, b"abcd")
    drv.put(table, DESC.pack(src, 4, VIRTQ_DESC_F_NEXT, 1) + DESC.pack(dst, 4, 2, 0))
    drv.put_desc(0, 0, table, 32, 4)
    drv.set_used_event(0, 0)
    drv.publish(0, 0)
    drv.kick(0)
    assert drv.used(0) == [(0, 4)] and drv.get(dst, 4) == b"abcd"
    assert drv.avail_event(0) == 1
    assert any(isinstance(e, MsiRaised) for e in drv.take())


def test_device_config_and_generation() -> None:
    fn, drv, dev = make()
    assert drv.read(DEVICE_CFG_OFFSET, 4) == int.from_bytes(ECHO_MAGIC, "little")
    drv.write(DEVICE_CFG_OFFSET + 4, 4, 0x1234)
    assert dev.scratch == 0x1234 and drv.read(DEVICE_CFG_OFFSET + 4, 4) == 0x1234
    assert drv.read(DEVICE_CFG_OFFSET + 0x100, 4) == 0  # past the structure
    drv.start()
    fn.config_changed()
    assert drv.read(CONFIG_GENERATION, 1) == 1
    assert [e.vector for e in drv.take() if isinstance(e, MsiRaised)] == [0]


# -- kicks that must be ignored (§2.1.2; matrix: "Kick before DRIVER_OK ...")


def test_kicks_before_driver_ok_are_ignored() -> None:
    _, drv, dev = make()
    drv.enable_bus_master()
    drv.negotiate()
    drv.setup_queue(0)
    echo(drv)
    assert dev.notifies == 0 and drv.used_idx(0) == 0


def test_kicks_on_unknown_disabled_or_misaligned_queues_are_ignored() -> None:
    _, drv, dev = make()
    drv.enable_bus_master()
    drv.negotiate()
    drv.setup_queue(0)  # queue 1 stays disabled
    drv.driver_ok()
    drv.kick(1)
    drv.kick(2)
    drv.kick(0x3FF)
    drv.write(0x3000 + 1, 1, 0)  # not a queue's notify address
    assert dev.notifies == 0


def test_kicks_without_bus_master_are_ignored() -> None:
    _, drv, dev = make()
    drv.start()
    drv.cfg_write(PCI_COMMAND, 2, 0)
    echo(drv)
    assert dev.notifies == 0 and drv.used_idx(0) == 0


def test_kicks_after_reset_are_ignored_and_nothing_is_written() -> None:
    _, drv, dev = make()
    drv.start()
    resets = dev.resets
    drv.set_status(0)
    assert drv.status == 0 and dev.resets == resets + 1
    echo(drv)
    assert dev.notifies == 0 and drv.used_idx(0) == 0


def test_kick_flood_does_bounded_work_per_kick() -> None:
    _, drv, _dev = make(EchoDevice(queue_max_sizes=(256,)))
    drv.start()
    for _ in range(QUEUE_WEIGHT + 10):
        head, _ = drv.add_request(0, b"x", 1)
        drv.publish(0, head)
    drv.kick(0)
    assert len(drv.used(0)) == QUEUE_WEIGHT and drv.fn.pending_work == {0}
    drv.fn.run_pending()
    assert len(drv.used(0)) == 10 and not drv.fn.pending_work


# -- register abuse (C6)


def test_queue_select_out_of_range_reads_0_and_takes_no_writes() -> None:
    _, drv, _ = make()
    drv.enable_bus_master()
    drv.negotiate()
    drv.write(QUEUE_SELECT, 2, 7)
    assert drv.read(QUEUE_SELECT, 2) == 7
    for register in (QUEUE_SIZE, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF, QUEUE_DESC_LO):
        drv.write(register, 2 if register != QUEUE_DESC_LO else 4, 1)
        assert drv.read(register, 2) == 0
    drv.write(QUEUE_SELECT, 2, 0)
    assert drv.read(QUEUE_SIZE, 2) == 16 and drv.read(QUEUE_ENABLE, 2) == 0


def test_queue_configuration_is_frozen_after_enable() -> None:
    _fn, drv, _ = make()
    drv.enable_bus_master()
    drv.negotiate()
    layout = drv.setup_queue(0)
    drv.write(QUEUE_SELECT, 2, 0)
    drv.write(QUEUE_SIZE, 2, 4)
    drv.write(QUEUE_DESC_LO, 4, 0xDEAD_0000)
    drv.write(QUEUE_DESC_HI, 4, 0xFFFF_FFFF)
    drv.write(QUEUE_ENABLE, 2, 0)  # disabling is not the driver's to do either
    assert drv.read(QUEUE_SIZE, 2) == layout.size and drv.read(QUEUE_ENABLE, 2) == 1
    assert drv.read(QUEUE_DESC_LO, 4) == layout.desc and drv.read(QUEUE_DESC_HI, 4) == 0
    drv.driver_ok()
    echo(drv)
    assert drv.used(0) == [(0, 4)]  # the device used what was programmed at enable


def test_an_invalid_queue_size_cannot_be_enabled() -> None:
    _, drv, _ = make()
    drv.negotiate()
    drv.write(QUEUE_SELECT, 2, 0)
    drv.write(QUEUE_SIZE, 2, 12)
    drv.write(QUEUE_ENABLE, 2, 1)
    assert drv.read(QUEUE_ENABLE, 2) == 0


def test_msix_vectors_beyond_the_table_read_back_no_vector() -> None:
    _, drv, _ = make()
    drv.write(CONFIG_MSIX_VECTOR, 2, 3)  # 2 queues + config = 3 vectors: 0..2
    assert drv.read(CONFIG_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    drv.write(QUEUE_MSIX_VECTOR, 2, 2)
    assert drv.read(QUEUE_MSIX_VECTOR, 2) == 2


def test_64bit_address_writes_and_odd_register_writes() -> None:
    _, drv, _ = make()
    drv.write(QUEUE_DESC_LO, 8, 0x1_2345_6780)
    assert drv.read(QUEUE_DESC_LO, 8) == 0x1_2345_6780
    drv.write(DEVICE_STATUS - 1, 2, 0xFFFF)  # spans num_queues and status: ignored
    drv.write(QUEUE_SELECT + 1, 1, 0xFF)  # half a register: ignored
    assert drv.status == 0 and drv.read(QUEUE_SELECT, 2) == 0


@given(
    ops=st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, VIRTIO_BAR_SIZE - 8),
            st.sampled_from([1, 2, 4, 8]),
            st.integers(0, (1 << 64) - 1),
        ),
        max_size=40,
    )
)
def test_any_width_at_any_offset_is_defined(ops: list[tuple[bool, int, int, int]]) -> None:
    fn, drv, _ = make()
    drv.start()
    for write, offset, size, value in ops:
        if write:
            fn.bar_write(VIRTIO_BAR, offset, size, value)
        else:
            assert 0 <= fn.bar_read(VIRTIO_BAR, offset, size) < 1 << (8 * size)
        fn.take_effects()


@given(
    ops=st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0x40, 0xFF),
            st.sampled_from([1, 2, 4]),
            st.integers(0, 0xFFFF_FFFF),
        ),
        max_size=40,
    )
)
def test_config_space_accesses_over_the_capabilities_are_defined(
    ops: list[tuple[bool, int, int, int]],
) -> None:
    """Random config cycles over the capability area (PCI_CFG window included) never
    raise, and the vendor capabilities the driver must not change stay put."""
    fn, drv, _ = make()
    drv.start()
    caps = vendor_caps(drv)
    before = {t: [drv.cfg_read(at + i, 4) for i in (0, 4, 8, 12)] for t, at in caps.items()}
    for write, offset, size, value in ops:
        offset -= offset % size  # config cycles are naturally aligned (PCI)
        if write:
            fn.config_write(offset, size, value)
        else:
            fn.config_read(offset, size)
        fn.take_effects()
    pci_cfg = VirtioPciCapType.VIRTIO_PCI_CAP_PCI_CFG
    for cfg_type, at in vendor_caps(drv).items():
        if cfg_type != pci_cfg:
            assert [drv.cfg_read(at + i, 4) for i in (0, 4, 8, 12)] == before[cfg_type]


# -- the PCI_CFG window (§4.1.4.9)


def _window(drv: FakeVirtioDriver, bar: int, offset: int, length: int) -> int:
    at = vendor_caps(drv)[VirtioPciCapType.VIRTIO_PCI_CAP_PCI_CFG]
    drv.cfg_write(at + CAP_BAR, 1, bar)
    drv.cfg_write(at + CAP_OFFSET, 4, offset)
    drv.cfg_write(at + CAP_LENGTH, 4, length)
    return at + PCI_CFG_CAP_DATA


def test_pci_cfg_window_reaches_the_registers() -> None:
    _, drv, _ = make()
    data = _window(drv, VIRTIO_BAR, DEVICE_STATUS, 1)
    drv.cfg_write(data, 1, A)
    assert drv.status == A and drv.cfg_read(data, 1) == A
    data = _window(drv, VIRTIO_BAR, NUM_QUEUES, 2)
    assert drv.cfg_read(data, 2) == 2


@pytest.mark.parametrize(
    ("bar", "offset", "length"),
    [
        (2, 0, 4),  # no such BAR
        (7, 0, 4),  # no such BAR at all
        (VIRTIO_BAR, DEVICE_STATUS, 3),  # bad length
        (VIRTIO_BAR, DEVICE_STATUS, 8),
        (VIRTIO_BAR, DEVICE_STATUS - 1, 2),  # misaligned
        (VIRTIO_BAR, VIRTIO_BAR_SIZE, 1),  # past the BAR
        (VIRTIO_BAR, 0xFFFF_FFFF, 1),
    ],
)
def test_pci_cfg_window_with_a_bad_target_is_ignored(bar: int, offset: int, length: int) -> None:
    _, drv, _ = make()
    data = _window(drv, bar, offset, length)
    drv.cfg_write(data, 4, 0xFFFF_FFFF)
    assert drv.cfg_read(data, 4) == 0 and drv.status == 0


# -- status abuse and NEEDS_RESET


def test_unoffered_features_leave_features_ok_clear() -> None:
    _, drv, dev = make()
    assert not drv.negotiate(features=dev.avail_features | 1 << 5) & F
    drv.driver_ok()
    assert not drv.status & OK and dev.activations == 0


def test_a_broken_ring_latches_needs_reset_until_status_0() -> None:
    _fn, drv, _dev = make()
    drv.start()
    drv.put_desc(0, 0, 0x8000, 4, VIRTQ_DESC_F_NEXT, 0)  # a loop
    drv.publish(0, 0)
    drv.kick(0)
    effects = drv.take()
    assert drv.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert any(isinstance(e, DeviceNeedsReset) for e in effects)
    assert [e.vector for e in effects if isinstance(e, MsiRaised)] == [0]  # config vector
    assert drv.used_idx(0) == 0
    drv.set_status(drv.status | OK)  # driver writes do not clear the latch
    echo(drv)
    assert drv.status & DeviceStatus.DEVICE_NEEDS_RESET and drv.used_idx(0) == 0
    # Reset and start over: the device works again.
    drv.queues.clear()
    drv.start()
    assert drv.status == A | D | F | OK
    echo(drv)
    assert drv.used(0) == [(0, 4)]


def test_needs_reset_without_msix_sets_isr_config_bit() -> None:
    _, drv, _ = make(msix=False)
    drv.start(msix=False)
    drv.set_avail_idx(0, 100)  # avail.idx jumps
    drv.kick(0)
    assert drv.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert drv.isr() == 2


def test_driver_ok_without_shared_memory_needs_reset() -> None:
    _, drv, dev = make(memory=False)
    drv.start()
    assert drv.status & DeviceStatus.DEVICE_NEEDS_RESET and dev.activations == 0


def test_rings_outside_ram_need_reset_at_driver_ok() -> None:
    _, drv, dev = make()
    drv.enable_bus_master()
    drv.negotiate()
    drv.setup_queue(0)
    drv.write(QUEUE_SELECT, 2, 1)
    drv.write(QUEUE_DESC_HI, 4, 0x100)  # far outside the 1 MiB of RAM
    drv.write(QUEUE_ENABLE, 2, 1)
    drv.driver_ok()
    assert drv.status & DeviceStatus.DEVICE_NEEDS_RESET and dev.activations == 0


def test_guest_memory_failing_under_a_device_needs_reset() -> None:
    fn, drv, _dev = make()
    drv.start()
    drv.mem.add(0x20_0000, bytearray(0x1000), read_only=True)
    head = drv.add_chain(0, [(0x8000, 4, False), (0x20_0000, 4, True)])
    drv.publish(0, head)
    drv.kick(0)
    assert drv.status & DeviceStatus.DEVICE_NEEDS_RESET and "read-only" in fn.needs_reset_reason


def test_function_level_reset_resets_virtio() -> None:
    fn, drv, dev = make()
    drv.start()
    resets = dev.resets
    fn.reset()
    assert drv.status == 0 and dev.resets == resets + 1 and drv.read(QUEUE_ENABLE, 2) == 0
