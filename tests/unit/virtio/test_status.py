"""Status and feature negotiation (§2.1, §2.2, §3.1.1): the transition table,
and h2-style Hypothesis over state x input (reliability.md §6 status abuse)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devserver.errors import ConfigError
from devserver.virtio.spec import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    DeviceStatus,
    feature_bit,
)
from devserver.virtio.status import DRIVER_BITS, TRANSITIONS, StatusAction, VirtioStatus

V1 = feature_bit(VIRTIO_F_VERSION_1)
EVENT_IDX = feature_bit(VIRTIO_F_RING_EVENT_IDX)
OFFERED = V1 | EVENT_IDX | 0x1
A, D, F, OK = (
    DeviceStatus.ACKNOWLEDGE,
    DeviceStatus.DRIVER,
    DeviceStatus.FEATURES_OK,
    DeviceStatus.DRIVER_OK,
)
NR, FAILED = DeviceStatus.DEVICE_NEEDS_RESET, DeviceStatus.FAILED


def features(s: VirtioStatus, value: int) -> None:
    s.write_driver_features_page(0, value & 0xFFFF_FFFF)
    s.write_driver_features_page(1, value >> 32)


def up_to_features_ok(value: int = V1) -> VirtioStatus:
    s = VirtioStatus(OFFERED)
    s.write(A)
    s.write(A | D)
    features(s, value)
    s.write(A | D | F)
    return s


def test_the_linux_handshake() -> None:
    s = up_to_features_ok(V1 | EVENT_IDX)
    assert s.status == A | D | F and s.acked == V1 | EVENT_IDX and s.has(VIRTIO_F_RING_EVENT_IDX)
    assert s.write(A | D | F | OK) == [StatusAction.ACTIVATE] and s.driver_ok


def test_device_feature_pages() -> None:
    s = VirtioStatus(OFFERED)
    assert (s.device_features_page(0), s.device_features_page(1)) == (EVENT_IDX | 1, 1)
    assert s.device_features_page(2) == 0 and s.device_features_page(0xFFFF_FFFF) == 0
    s.write_driver_features_page(7, 0xFFFF_FFFF)  # no such page: ignored
    assert s.driver_features == 0


@pytest.mark.parametrize("acked", [V1 | 0x2, 1 << 63 | V1, EVENT_IDX, 0])
def test_features_ok_is_refused_for_unoffered_bits_or_without_version_1(acked: int) -> None:
    s = up_to_features_ok(acked)
    assert s.status == A | D and not s.features_ok and s.acked == 0
    assert s.write(A | D | F | OK) == [] and not s.driver_ok  # DRIVER_OK needs FEATURES_OK


def test_features_are_frozen_after_features_ok() -> None:
    s = up_to_features_ok(V1)
    features(s, V1 | EVENT_IDX)
    assert s.driver_features == V1 and s.acked == V1


def test_bits_without_their_prerequisites_are_dropped() -> None:
    s = VirtioStatus(OFFERED)
    assert s.write(OK) == [] and s.status == 0
    assert s.write(D) == [] and s.status == 0
    s.write(A | D | OK)  # OK needs FEATURES_OK: dropped, the rest stays
    assert s.status == A | D


def test_driver_ok_twice_activates_once() -> None:
    s = up_to_features_ok()
    assert s.write(A | D | F | OK) == [StatusAction.ACTIVATE]
    assert s.write(A | D | F | OK) == []


def test_clearing_bits_is_ignored_and_0_resets() -> None:
    s = up_to_features_ok()
    s.write(A | D | F | OK)
    s.write(A)
    assert s.status == A | D | F | OK
    assert s.write(0) == [StatusAction.RESET]
    assert (s.status, s.acked, s.driver_features) == (0, 0, 0)


def test_needs_reset_is_the_devices_alone() -> None:
    s = up_to_features_ok()
    s.write(A | D | F | NR)
    assert not s.needs_reset
    assert s.latch_needs_reset() and not s.latch_needs_reset()
    s.write(A | D | F | OK)
    assert s.needs_reset and s.status & OK  # the latch stays through other writes
    s.write(0)
    assert not s.needs_reset


def test_failed_can_be_set_at_any_time() -> None:
    s = VirtioStatus(OFFERED)
    s.write(FAILED)
    assert s.status == FAILED


def test_a_device_must_offer_version_1() -> None:
    with pytest.raises(ConfigError):
        VirtioStatus(EVENT_IDX)
    with pytest.raises(ConfigError):
        VirtioStatus(1 << 64)


def _legal(status: int) -> bool:
    """Every set driver bit has its prerequisites set (TRANSITIONS is the spec)."""
    return all(not status & bit or status & needs == needs for bit, needs, _ in TRANSITIONS)


@given(
    writes=st.lists(
        st.one_of(
            st.integers(0, 255),
            st.sampled_from([0, A, A | D, A | D | F, A | D | F | OK, NR, FAILED]),
        ),
        max_size=12,
    ),
    acked=st.sampled_from([V1, V1 | EVENT_IDX, V1 | 2, 0, OFFERED]),
)
def test_every_write_sequence_keeps_the_status_legal(writes: list[int], acked: int) -> None:
    s = VirtioStatus(OFFERED)
    activations = 0
    for value in writes:
        features(s, acked)
        before = s.status
        actions = s.write(value)
        activations += actions.count(StatusAction.ACTIVATE)
        assert _legal(s.status)
        assert s.status & ~(DRIVER_BITS | NR) == 0
        if value == 0:
            assert s.status == 0 and actions == [StatusAction.RESET]
            activations = 0
        else:
            assert s.status & before == before  # nothing cleared but by writing 0
        if s.features_ok:
            assert s.acked and not s.acked & ~OFFERED and s.acked & V1
        assert activations == (1 if s.driver_ok else 0)
