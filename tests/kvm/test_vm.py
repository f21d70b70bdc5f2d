"""The VM itself, with hand-assembled guests: exits, the UART, memslots, clean ends.

Each guest is a few bytes of 64-bit code entered in long mode at 1 MiB
(boot.py). Under kvm_pvm ring-0 code is emulated, so they stay tiny.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vmm_client.kvm import abi
from vmm_client.kvm.boot import LOAD_ADDRESS, enter_long_mode, load_program
from vmm_client.kvm.devices import DEBUG_EXIT_PORT, DebugExit, PciHost, Serial16550
from vmm_client.kvm.vm import GuestRam, KvmUnavailable, RunResult, Vm, open_kvm

MiB = 1 << 20

# 64-bit encodings used below.
HLT = b"\xf4"


def mov_eax(value: int) -> bytes:
    return b"\xb8" + struct.pack("<I", value)


def mov_ecx(value: int) -> bytes:
    return b"\xb9" + struct.pack("<I", value)


def mov_dx(port: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port)


OUT_DX_AL = b"\xee"
OUT_DX_EAX = b"\xef"
IN_EAX_DX = b"\xed"
DEC_ECX = b"\xff\xc9"


def exit_with_eax() -> bytes:
    """out %eax, $0xF4: the debug-exit port."""
    return b"\xe7" + bytes((DEBUG_EXIT_PORT,))


def load_eax_from(address: int) -> bytes:
    """mov eax, [address] (32-bit absolute, SIB form)."""
    return b"\x8b\x04\x25" + struct.pack("<I", address)


def run_code(
    code: bytes,
    *,
    irqchip: bool = False,
    setup: Callable[[Vm], None] | None = None,
    timeout: float = 20.0,
) -> tuple[RunResult, Serial16550]:
    with Vm(4 * MiB, irqchip=irqchip) as vm:
        uart = Serial16550(output=lambda b: None)
        vm.pio.add(uart.ports, uart)
        vm.pio.add(range(DEBUG_EXIT_PORT, DEBUG_EXIT_PORT + 4), DebugExit())
        PciHost(vm)  # the empty bus: all-ones everywhere
        if setup is not None:
            setup(vm)
        program = load_program(vm.ram, code)
        vcpu = vm.create_vcpu()
        enter_long_mode(vcpu, program.entry)
        return vm.run(timeout), uart


def test_open_kvm_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(KvmUnavailable, match="modprobe"):
        open_kvm(str(tmp_path / "nokvm"))
    not_kvm = tmp_path / "file"
    not_kvm.write_bytes(b"")
    with pytest.raises(KvmUnavailable, match="not a KVM device"):
        open_kvm(str(not_kvm))


@pytest.mark.kvm
def test_debug_port_ends_the_run_with_a_status() -> None:
    result, _ = run_code(mov_eax(42) + exit_with_eax() + HLT)
    assert (result.reason, result.status) == ("exit-port", 42)
    assert result.exits == {"IO": 1}


@pytest.mark.kvm
def test_hlt_ends_the_run_without_an_irqchip() -> None:
    # With the in-kernel LAPIC, HLT blocks inside KVM instead (frontend-kvm.md).
    result, _ = run_code(b"\x90\x90" + HLT)
    assert result.reason == "hlt"
    assert f"rip {LOAD_ADDRESS + 3:#x}" in result.message


@pytest.mark.kvm
def test_uart_prints_what_the_guest_sends() -> None:
    code = mov_dx(0x3FD) + b"\xec"  # in al, dx: LSR
    code += b"\x88\xc3"  # mov bl, al
    code += mov_dx(0x3F8)
    for ch in b"hi!\n":
        code += b"\xb0" + bytes((ch,)) + OUT_DX_AL  # mov al, ch; out dx, al
    code += b"\x0f\xb6\xc3"  # movzx eax, bl
    code += exit_with_eax()
    result, uart = run_code(code)
    assert uart.text == "hi!\n"
    assert result.status == 0x60  # LSR: THRE | TEMT


@pytest.mark.kvm
def test_triple_fault_is_a_shutdown() -> None:
    result, _ = run_code(b"\x0f\x0b")  # ud2 with no IDT: #UD, #DF, triple fault
    assert result.reason in ("shutdown", "internal-error"), result
    assert "rip" in result.message


@pytest.mark.kvm
def test_refused_instruction_reports_rip_and_bytes() -> None:
    # kvm_pvm's emulator refuses ring-0 int3 (internal error); hardware KVM
    # delivers #BP, and with no IDT that is a triple fault.
    result, _ = run_code(b"\x90\xcc\x90")
    if result.reason == "internal-error":
        assert f"rip {LOAD_ADDRESS + 1:#x}" in result.message
        assert "instruction bytes cc 90" in result.message
    else:
        assert result.reason == "shutdown"


@pytest.mark.kvm
def test_unclaimed_reads_are_all_ones() -> None:
    code = mov_dx(0x1234) + IN_EAX_DX + exit_with_eax()
    result, _ = run_code(code)
    assert result.status == 0xFFFF_FFFF


@pytest.mark.kvm
def test_memslots_add_move_delete() -> None:
    extra = GuestRam(64 * 1024, "extra")
    extra.write(0, struct.pack("<I", 0xC0FFEE))
    try:
        with Vm(4 * MiB) as vm:
            PciHost(vm)
            vm.pio.add(range(DEBUG_EXIT_PORT, DEBUG_EXIT_PORT + 4), DebugExit())
            slot = vm.add_memslot(0x1000_0000, extra.size, extra.address)
            vcpu = vm.create_vcpu()

            def read_at(address: int) -> int | None:
                load_program(vm.ram, load_eax_from(address) + exit_with_eax())
                enter_long_mode(vcpu, LOAD_ADDRESS)
                return vm.run(10).status

            assert read_at(0x1000_0000) == 0xC0FFEE
            vm.move_memslot(slot, 0x2000_0000)
            assert read_at(0x2000_0000) == 0xC0FFEE
            assert read_at(0x1000_0000) == 0xFFFF_FFFF  # now an MMIO exit nobody claims
            vm.delete_memslot(slot)
            assert read_at(0x2000_0000) == 0xFFFF_FFFF
            # The memfd is shared: what the guest sees is what another mapping sees.
            assert os.pread(vm.ram.fd, 4, LOAD_ADDRESS) == load_eax_from(0x2000_0000)[:4]
    finally:
        extra.close()


@pytest.mark.kvm
def test_a_stuck_guest_times_out_and_is_stopped() -> None:
    result, _ = run_code(b"\xeb\xfe", timeout=0.5)  # jmp .
    assert result.reason == "timeout"


@pytest.mark.kvm
def test_msi_without_a_listening_lapic_is_counted() -> None:
    with Vm(4 * MiB, irqchip=True) as vm:
        vm.create_vcpu()
        assert vm.signal_msi(0xFEE0_0000, 0x41) is False  # LAPIC not enabled: dropped
        assert (vm.msis_signalled, vm.msis_delivered) == (1, 0)


@pytest.mark.kvm
def test_pio_exit_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    """Measure: a guest `out` to a port handled in Python, end to end."""
    n = 20_000
    loop = b"\xe6\x80" + DEC_ECX + b"\x75\xfa"  # out 0x80, al; dec ecx; jnz loop
    code = mov_ecx(n) + loop + b"\x31\xc0" + exit_with_eax()
    start = time.perf_counter()
    result, _ = run_code(code, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.ok and result.exits["IO"] == n + 1
    with capsys.disabled():
        print(
            f"\nPIO exit round trip into Python: {result.seconds / n * 1e6:.1f} us "
            f"({n} exits in {result.seconds:.2f} s; VM set-up and run {elapsed:.2f} s)"
        )


@pytest.mark.kvm
def test_cpuid_is_set_from_what_kvm_supports() -> None:
    with Vm(4 * MiB) as vm:
        table = abi.cpuid2_entries(vm.supported_cpuid())
        leaves = {e.function for e in table}
        assert {0, 1, 0x8000_0000, 0x8000_0001} <= leaves
        max_basic = next(e.eax for e in table if e.function == 0)
    # cpuid leaf 0 in the guest: EAX = highest basic leaf, what we handed KVM.
    code = b"\x31\xc0\x31\xc9\x0f\xa2" + exit_with_eax()  # xor eax,eax; xor ecx,ecx; cpuid
    result, _ = run_code(code)
    assert (result.reason, result.status) == ("exit-port", max_basic)


@pytest.mark.kvm
def test_other_vcpus_wait_for_sipi_unless_made_runnable() -> None:
    """With the in-kernel LAPIC, vCPU 1 starts UNINITIALIZED (KVM_RUN would wait for
    INIT/SIPI); a freestanding program's VMM makes it RUNNABLE instead."""
    with Vm(4 * MiB, irqchip=True) as vm:
        bsp, ap = vm.create_vcpu(), vm.create_vcpu()
        assert bsp.get_mp_state() == abi.KVM_MP_STATE_RUNNABLE
        assert ap.get_mp_state() == abi.KVM_MP_STATE_UNINITIALIZED
        ap.make_runnable()
        assert ap.get_mp_state() == abi.KVM_MP_STATE_RUNNABLE
