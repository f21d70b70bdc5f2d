"""A Linux-style enumeration through the client agrees with the topology RPC.

Probe all 32 slots, size every BAR, assign, enable, move a BAR while it
decodes (onto another device's BAR), disable: after every step the routing
table built only from the server's events matches what the probe programmed.
"""

from __future__ import annotations

from devserver.effects import AddressRange, BarDecodeChanged, BarKind, Effect
from devserver.pci import regs
from devserver.service.convert import kind_from_pb
from devserver.service.server import DevServer
from vmm_client.client import AsyncSession, FrontendOptions, get_stats, open_channel
from vmm_client.probe import assign_and_enable, format_lspci, probe_bus
from vmm_client.routing import RoutingTable


def _apply(table: RoutingTable, effect: Effect) -> None:
    if isinstance(effect, BarDecodeChanged):
        table.apply(effect)


async def test_enumeration_matches_topology_and_routing_follows(server: DevServer) -> None:
    table = RoutingTable()
    async with open_channel(server.address) as channel:
        s = await AsyncSession.attach(
            channel, FrontendOptions("enum"), on_event=lambda e: _apply(table, e)
        )
        functions = await probe_bus(s)
        # Probing with decoding off never made anything decode.
        assert table.ranges() == {}

        topology = {d.device: d for d in s.topology.devices}
        assert [f.device for f in functions] == sorted(topology)
        for f in functions:
            info = topology[f.device]
            assert (f.vendor_id, f.device_id, f.class_code, f.revision) == (
                info.vendor_id,
                info.product_id,
                info.class_code,
                info.revision,
            )
            assert (f.subsystem_vendor_id, f.subsystem_id) == (
                info.subsystem_vendor_id,
                info.subsystem_id,
            )
            assert [(b.index, b.kind, b.size, b.prefetchable) for b in f.bars] == [
                (b.index, kind_from_pb(b.kind), b.size, b.prefetchable) for b in info.bars
            ]
            cap_ids = [cap for _, cap in f.capabilities]
            assert cap_ids == [regs.PCI_CAP_ID_PM, regs.PCI_CAP_ID_MSIX, regs.PCI_CAP_ID_EXP]
            assert [(c, v) for _, c, v in f.ext_capabilities] == [(regs.PCI_EXT_CAP_ID_DSN, 1)]
            assert "Express" in format_lspci(f)

        await assign_and_enable(s, functions)
        expected = {
            (f.device, b.index): AddressRange(b.address, b.size)
            for f in functions
            for b in f.bars
            if b.kind is not BarKind.ROM  # Linux leaves ROMs disabled
        }
        assert table.ranges() == expected
        first, second = functions
        io_bar = next(b for b in first.bars if b.kind is BarKind.IO)
        assert table.lookup_pio(io_bar.address + 4, 4) == (first.device, io_bar.index, 4)

        # Move the first device's 64-bit BAR onto the second's while both decode.
        moving = next(b for b in first.bars if b.kind is BarKind.MEM64)
        victim = next(b for b in second.bars if b.kind is BarKind.MEM64)
        bdf = (0, first.device, 0)
        register = regs.PCI_BASE_ADDRESS_0 + 4 * moving.index
        await s.config_write(*bdf, register + 4, 4, victim.address >> 32)
        events = await s.config_write(*bdf, register, 4, victim.address & 0xFFFF_FFFF)
        assert [
            (e.device_id, e.bar, e.decoding) for e in events if isinstance(e, BarDecodeChanged)
        ] == [
            (second.device, victim.index, False),
            (first.device, moving.index, True),
        ]
        assert table.range_of(second.device, victim.index) is None
        assert table.range_of(first.device, moving.index) == AddressRange(
            victim.address, victim.size
        )
        # Accesses now reach the mover, at its BAR-relative offset.
        assert table.lookup_mmio(victim.address + 0x10, 4) == (first.device, moving.index, 0x10)
        assert await s.bar_read(first.device, moving.index, 0x10, 4) == moving.index

        # Moving it back uncovers the victim again.
        await s.config_write(*bdf, register, 4, moving.address & 0xFFFF_FFFF)
        await s.config_write(*bdf, register + 4, 4, moving.address >> 32)
        assert table.ranges() == expected

        # Disabling decoding empties the first device's routes, leaving the second's.
        await s.config_write(*bdf, regs.PCI_COMMAND, 2, 0)
        assert {key for key in table.ranges() if key[0] == first.device} == set()
        assert {key for key in table.ranges() if key[0] == second.device} == {
            key for key in expected if key[0] == second.device
        }
        # The routing table and the server agree: the stats saw every change.
        stats = await get_stats(channel)
        assert sum(d.bar_decode_changes for d in stats.devices) == table.generation
        await s.close()
