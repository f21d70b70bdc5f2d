"""Guest code at ring 3: native speed under kvm_pvm; port IO with IOPL 3, MMIO, ECAM.

kvm_pvm emulates ring-0 code of a non-PVM guest instruction by instruction
but runs ring 3 natively. IOPL 3 lets ring-3 code use ports on hardware KVM;
under kvm_pvm ring-3 port IO exits to the VMM whatever the IOPL. ECAM gives
config space through memory either way.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from devserver.devices import testdev
from devserver.service.server import DevServer
from vmm_client.addressing import EcamWindow
from vmm_client.client import FrontendOptions, SyncSession
from vmm_client.kvm.boot import LOAD_ADDRESS, RFLAGS_IOPL3, enter_long_mode, load_program
from vmm_client.kvm.devices import DEBUG_EXIT_MMIO, DEBUG_EXIT_PORT, DebugExit, PciHost
from vmm_client.kvm.vm import RunResult, Vm, kvm_flavour

pytestmark = pytest.mark.kvm

ECAM = EcamWindow(0xB000_0000, 1 << 20)  # bus 0 only
BAR_ADDRESS = 0xE000_0000


def mov_rbx(value: int) -> bytes:
    return b"\x48\xbb" + struct.pack("<Q", value)


def mov_rax(value: int) -> bytes:
    return b"\x48\xb8" + struct.pack("<Q", value)


STORE_EAX_AT_RBX = b"\x89\x03"
EXIT_MMIO = mov_rbx(DEBUG_EXIT_MMIO) + STORE_EAX_AT_RBX


def counting_loop(n: int) -> bytes:
    return b"\xb9" + struct.pack("<I", n) + b"\xff\xc9\x75\xfc"  # mov ecx, n; dec; jnz


def run(
    code: bytes, *, user: bool, session_address: str | None = None, iopl3: bool = True
) -> RunResult:
    with Vm(4 << 20) as vm:
        debug_exit = DebugExit()
        vm.pio.add(range(DEBUG_EXIT_PORT, DEBUG_EXIT_PORT + 4), debug_exit)
        vm.mmio.add(DEBUG_EXIT_MMIO, 0x1000, debug_exit)
        pci = PciHost(vm)
        pci.enable_ecam(ECAM)
        session = (
            SyncSession(session_address, FrontendOptions("ring3"), pci.handle_event)
            if session_address
            else None
        )
        try:
            if session is not None:
                pci.attach(session)
            load_program(vm.ram, code)
            vcpu = vm.create_vcpu()
            enter_long_mode(vcpu, LOAD_ADDRESS, user=user)
            if not iopl3:
                regs = vcpu.get_regs()
                regs.rflags &= ~RFLAGS_IOPL3
                vcpu.set_regs(regs)
            return vm.run(60)
        finally:
            if session is not None:
                session.close()


def test_ring3_runs_and_exits_through_mmio() -> None:
    result = run(b"\xb8\x07\x00\x00\x00" + EXIT_MMIO, user=True)
    assert (result.reason, result.status) == ("exit-port", 7)


def test_ring3_is_much_faster_than_ring0(capsys: pytest.CaptureFixture[str]) -> None:
    ring0_n, ring3_n = 100_000, 10_000_000
    ring0 = run(counting_loop(ring0_n) + b"\x31\xc0" + EXIT_MMIO, user=False)
    ring3 = run(counting_loop(ring3_n) + b"\x31\xc0" + EXIT_MMIO, user=True)
    assert ring0.ok and ring3.ok
    per0 = ring0.seconds / ring0_n * 1e9
    per3 = ring3.seconds / ring3_n * 1e9
    with capsys.disabled():
        print(f"\nloop iteration (dec; jnz): ring 0 {per0:.0f} ns, ring 3 {per3:.1f} ns")
    if kvm_flavour() == "pvm":
        assert per3 * 20 < per0


def test_ring3_port_io() -> None:
    out_f4 = b"\x31\xc0\xe7" + bytes((DEBUG_EXIT_PORT,))  # xor eax, eax; out 0xf4, eax
    result = run(out_f4, user=True)
    assert (result.reason, result.status) == ("exit-port", 0)
    result = run(out_f4, user=True, iopl3=False)
    if kvm_flavour() == "pvm":
        # PVM forwards ring-3 port IO without checking the guest's IOPL.
        assert (result.reason, result.status) == ("exit-port", 0)
    else:
        # IOPL 0 at CPL 3: #GP, and with no IDT a triple fault.
        assert result.reason == "shutdown", result


def test_ring3_is_really_ring3() -> None:
    for privileged in (b"\xf4", b"\x0f\x20\xd8"):  # hlt; mov rax, cr3
        result = run(privileged, user=True)
        assert result.reason == "shutdown", result  # #GP, no IDT


async def test_ring3_programs_a_bar_through_ecam(server: DevServer) -> None:
    dev = ECAM.base + (1 << 15)  # 00:01.0
    code = mov_rbx(dev)
    code += b"\xc7\x43\x18" + struct.pack("<I", BAR_ADDRESS)  # BAR2 low
    code += b"\xc7\x43\x1c" + struct.pack("<I", 0)  # BAR2 high
    code += b"\x66\xc7\x43\x04\x02\x00"  # COMMAND = MEM
    code += mov_rax(BAR_ADDRESS) + b"\x8b\x00"  # mov eax, [rax]: the ID register
    code += EXIT_MMIO
    result = await asyncio.to_thread(run, code, user=True, session_address=server.address)
    assert (result.reason, result.status) == ("exit-port", testdev.ID_VALUE)
    assert result.exits["MMIO"] == 5


def test_ecam_without_a_server_reads_all_ones() -> None:
    code = mov_rax(ECAM.base + (1 << 15)) + b"\x8b\x00" + EXIT_MMIO  # empty bus
    result = run(code, user=True)
    assert result.status == 0xFFFF_FFFF
