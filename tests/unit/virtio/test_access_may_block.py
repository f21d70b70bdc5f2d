"""Which accesses to a virtio function can run the device (and so must leave a
shell's event loop): VirtioPciFunction.access_may_block and
config_access_may_block. The property that matters: an access said not to
block never reaches the device's notify, activate or reset hooks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devserver.errors import AccessError
from devserver.virtio.pci_transport import (
    CAP_BAR,
    CAP_LENGTH,
    CAP_OFFSET,
    DEVICE_CFG_OFFSET,
    DEVICE_FEATURE_SELECT,
    DEVICE_STATUS,
    ISR_CFG_OFFSET,
    MSIX_BAR,
    MSIX_BAR_SIZE,
    NOTIFY_CFG_OFFSET,
    PCI_CFG_CAP_DATA,
    QUEUE_DESC_LO,
    QUEUE_SELECT,
    VIRTIO_BAR,
    VIRTIO_BAR_SIZE,
    VirtioPciFunction,
)
from devserver.virtio.spec import VirtioPciCapType
from tests.unit.virtio.driver import EchoDevice, FakeVirtioDriver, make


def hooks(device: EchoDevice) -> tuple[int, int, int]:
    return device.notifies, device.activations, device.resets


@pytest.mark.parametrize(
    ("bar", "offset", "write", "blocks"),
    [
        (VIRTIO_BAR, NOTIFY_CFG_OFFSET, True, True),
        (VIRTIO_BAR, NOTIFY_CFG_OFFSET + 4, True, True),
        (VIRTIO_BAR, NOTIFY_CFG_OFFSET + 0xFFC, True, True),
        (VIRTIO_BAR, DEVICE_STATUS, True, True),
        (VIRTIO_BAR, NOTIFY_CFG_OFFSET, False, False),
        (VIRTIO_BAR, DEVICE_STATUS, False, False),
        (VIRTIO_BAR, QUEUE_SELECT, True, False),
        (VIRTIO_BAR, DEVICE_FEATURE_SELECT, True, False),
        (VIRTIO_BAR, QUEUE_DESC_LO, True, False),
        (VIRTIO_BAR, ISR_CFG_OFFSET, True, False),
        (VIRTIO_BAR, DEVICE_CFG_OFFSET + 4, True, False),
        (MSIX_BAR, 0x000, True, False),
        (MSIX_BAR, 0x800, True, False),
    ],
)
def test_what_blocks(bar: int, offset: int, write: bool, blocks: bool) -> None:
    fn, _, _ = make()
    assert fn.access_may_block(bar, offset, write) is blocks


def _pci_cfg(fn: VirtioPciFunction) -> int:
    return fn.caps[VirtioPciCapType.VIRTIO_PCI_CAP_PCI_CFG].cap_offset


def test_a_config_write_blocks_only_through_a_window_onto_a_blocking_register() -> None:
    fn, drv, _ = make()
    at = _pci_cfg(fn)
    data = at + PCI_CFG_CAP_DATA
    assert not fn.config_access_may_block(0x04, 2, True)  # the command register
    assert not fn.config_access_may_block(data, 4, False)  # a read of the window
    assert not fn.config_access_may_block(data, 4, True)  # no window set up: ignored
    drv.cfg_write(at + CAP_BAR, 1, VIRTIO_BAR)
    drv.cfg_write(at + CAP_LENGTH, 4, 2)
    drv.cfg_write(at + CAP_OFFSET, 4, QUEUE_SELECT)
    assert not fn.config_access_may_block(data, 2, True)
    drv.cfg_write(at + CAP_OFFSET, 4, NOTIFY_CFG_OFFSET)
    assert fn.config_access_may_block(data, 2, True)
    assert not fn.config_access_may_block(at + CAP_OFFSET, 4, True)  # moving the window


def started() -> tuple[VirtioPciFunction, FakeVirtioDriver, EchoDevice]:
    fn, drv, dev = make()
    drv.start(queues=2)
    return fn, drv, dev


_SIZES = st.sampled_from([1, 2, 4, 8])
# Where the device's hooks are one write away, so the search goes there often.
_REGISTERS = st.sampled_from(
    [DEVICE_STATUS, NOTIFY_CFG_OFFSET, NOTIFY_CFG_OFFSET + 4, QUEUE_SELECT, DEVICE_CFG_OFFSET]
)


@settings(max_examples=300, deadline=None)
@given(
    writes=st.lists(
        st.tuples(
            st.sampled_from([VIRTIO_BAR, MSIX_BAR]),
            st.one_of(st.integers(0, VIRTIO_BAR_SIZE - 1), _REGISTERS),
            _SIZES,
            st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 0xF])),
        ),
        max_size=40,
    )
)
def test_a_bar_write_said_not_to_block_never_runs_the_device(
    writes: list[tuple[int, int, int, int]],
) -> None:
    fn, _, dev = started()
    for bar, offset, size, value in writes:
        if fn.access_may_block(bar, offset, True):
            continue
        limit = VIRTIO_BAR_SIZE if bar == VIRTIO_BAR else MSIX_BAR_SIZE
        before = hooks(dev)
        try:
            fn.bar_write(bar, offset % limit, size, value & ((1 << (8 * size)) - 1))
        except AccessError:
            continue  # past the BAR's end: refused, and refused before the device
        assert hooks(dev) == before, (bar, hex(offset % limit), size)


@settings(max_examples=200, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, 0xFFF), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)),
        max_size=40,
    ),
    window=st.tuples(
        st.sampled_from([VIRTIO_BAR, MSIX_BAR, 0, 7]),
        st.integers(0, VIRTIO_BAR_SIZE),
        st.sampled_from([0, 1, 2, 4, 8]),
    ),
)
def test_a_config_write_said_not_to_block_never_runs_the_device(
    writes: list[tuple[int, int, int]], window: tuple[int, int, int]
) -> None:
    fn, drv, dev = started()
    at = _pci_cfg(fn)
    bar, offset, length = window
    drv.cfg_write(at + CAP_BAR, 1, bar)
    drv.cfg_write(at + CAP_OFFSET, 4, offset)
    drv.cfg_write(at + CAP_LENGTH, 4, length)
    # Writes into the window's data field, or anywhere else.
    for where, size, value in [(at + PCI_CFG_CAP_DATA, length or 4, 1), *writes]:
        offset_in_space = where - where % size
        if fn.config_access_may_block(offset_in_space, size, True):
            continue
        before = hooks(dev)
        try:
            fn.config_write(offset_in_space, size, value & ((1 << (8 * size)) - 1))
        except AccessError:
            continue
        assert hooks(dev) == before, (hex(offset_in_space), size)


def test_a_kick_and_a_status_write_do_run_the_device() -> None:
    """The other side: what is said to block is what reaches the hooks."""
    fn, drv, dev = started()
    assert fn.access_may_block(VIRTIO_BAR, NOTIFY_CFG_OFFSET, True)
    notifies = dev.notifies
    drv.kick(0)
    assert dev.notifies == notifies + 1
    assert fn.access_may_block(VIRTIO_BAR, DEVICE_STATUS, True)
    resets = dev.resets
    drv.write(DEVICE_STATUS, 1, 0)
    assert dev.resets == resets + 1
