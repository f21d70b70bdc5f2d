"""Shared-memory BARs as KVM memslots that follow the server's BAR events.

A BAR whose bytes live in a file both sides map (a framebuffer) should not
exit on every access: the frontend maps the file and gives KVM a memslot at
the BAR's address. When the BAR moves, the same slot moves
(KVM_SET_USER_MEMORY_REGION with the same id and size at a new address);
when it stops decoding, the slot goes and the mapping with it. Accesses then
never reach the routing table, which still holds the BAR (so a frontend
without memslots would route them to the server instead).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from devserver.effects import BarDecodeChanged, SharedMemory

from .sysapi import mmap_shared, munmap
from .vm import PAGE, Vm


class MemslotError(RuntimeError):
    """A shared-memory BAR that cannot become a memslot (unaligned, unopenable)."""


@dataclass(slots=True)
class _Mapped:
    slot: int
    backing: SharedMemory
    host_address: int


@dataclass(frozen=True, slots=True)
class SlotChange:
    """What happened to a BAR's memslot: "map", "move" (same slot, new address) or "unmap"."""

    action: str
    device_id: int
    bar: int
    slot: int
    guest_address: int


class SharedBarSlots:
    """Keeps one memslot per decoding shared-memory BAR; `changes` says what it did."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self._mapped: dict[tuple[int, int], _Mapped] = {}
        self.changes: list[SlotChange] = []

    def apply(self, event: BarDecodeChanged) -> None:
        """Follow one BarDecodeChanged (events without backing are ignored unless held)."""
        key = (event.device_id, event.bar)
        held = self._mapped.get(key)
        if event.new is None or event.backing is None:
            if held is not None:
                self._unmap(key, held)
            return
        if event.new.base % PAGE or event.new.size % PAGE:
            # KVM slots are page granular; such a BAR keeps exiting (still routed).
            if held is not None:
                self._unmap(key, held)
            return
        if held is not None and held.backing == event.backing:
            self.vm.move_memslot(held.slot, event.new.base)
            self.changes.append(SlotChange("move", *key, held.slot, event.new.base))
            return
        if held is not None:
            self._unmap(key, held)
        host = self._map(event.backing)
        try:
            slot = self.vm.add_memslot(event.new.base, event.backing.size, host)
        except BaseException:
            munmap(host, event.backing.size)
            raise
        self._mapped[key] = _Mapped(slot, event.backing, host)
        self.changes.append(SlotChange("map", *key, slot, event.new.base))

    def slot_of(self, device_id: int, bar: int) -> int | None:
        held = self._mapped.get((device_id, bar))
        return held.slot if held is not None else None

    def _map(self, backing: SharedMemory) -> int:
        if backing.file_offset % PAGE or backing.size % PAGE:
            raise MemslotError(f"shared BAR memory {backing} is not page aligned")
        try:
            fd = os.open(backing.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise MemslotError(f"cannot open shared BAR memory {backing.path}: {e}") from None
        try:
            return mmap_shared(fd, backing.size, backing.file_offset)
        finally:
            os.close(fd)  # the mapping keeps the file alive

    def _unmap(self, key: tuple[int, int], held: _Mapped) -> None:
        address = self.vm.memslots[held.slot].guest_address
        self.vm.delete_memslot(held.slot)
        self.changes.append(SlotChange("unmap", *key, held.slot, address))
        munmap(held.host_address, held.backing.size)
        del self._mapped[key]

    def close(self) -> None:
        """Drop every slot (before the VM closes)."""
        for key, held in list(self._mapped.items()):
            self._unmap(key, held)
