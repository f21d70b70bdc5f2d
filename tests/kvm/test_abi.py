"""The ctypes ABI against the kernel's own headers, compiled with gcc.

These need no /dev/kvm (only gcc and linux-libc-dev), so they are not
marked `kvm`: a layout mistake should fail everywhere.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from vmm_client.kvm import abi

HEADER = Path("/usr/include/linux/kvm.h")

# (C expression, our value)
IOCTLS = {
    name: getattr(abi, name)
    for name in (
        "KVM_GET_API_VERSION",
        "KVM_CREATE_VM",
        "KVM_CHECK_EXTENSION",
        "KVM_GET_VCPU_MMAP_SIZE",
        "KVM_CREATE_VCPU",
        "KVM_SET_USER_MEMORY_REGION",
        "KVM_RUN",
        "KVM_GET_REGS",
        "KVM_SET_REGS",
        "KVM_GET_SREGS",
        "KVM_SET_SREGS",
        "KVM_SET_TSS_ADDR",
        "KVM_CREATE_IRQCHIP",
        "KVM_CREATE_PIT2",
        "KVM_SIGNAL_MSI",
        "KVM_IRQ_LINE",
        "KVM_GET_SUPPORTED_CPUID",
        "KVM_SET_CPUID2",
        "KVM_SET_SIGNAL_MASK",
        "KVM_SET_MSRS",
        "KVM_GET_LAPIC",
        "KVM_SET_LAPIC",
        "KVM_GET_MP_STATE",
        "KVM_SET_MP_STATE",
        "KVM_MP_STATE_RUNNABLE",
        "KVM_MP_STATE_UNINITIALIZED",
    )
}
SIZES = {
    "struct kvm_userspace_memory_region": abi.kvm_userspace_memory_region,
    "struct kvm_regs": abi.kvm_regs,
    "struct kvm_sregs": abi.kvm_sregs,
    "struct kvm_segment": abi.kvm_segment,
    "struct kvm_dtable": abi.kvm_dtable,
    "struct kvm_pit_config": abi.kvm_pit_config,
    "struct kvm_msi": abi.kvm_msi,
    "struct kvm_irq_level": abi.kvm_irq_level,
    "struct kvm_cpuid_entry2": abi.kvm_cpuid_entry2,
    "struct kvm_cpuid2": abi.kvm_cpuid2,
    "struct kvm_signal_mask": abi.kvm_signal_mask,
    "struct kvm_msrs": abi.kvm_msrs,
    "struct kvm_msr_entry": abi.kvm_msr_entry,
    "struct kvm_lapic_state": abi.kvm_lapic_state,
    "struct kvm_mp_state": abi.kvm_mp_state,
}
OFFSETS = {
    "exit_reason": abi.kvm_run.exit_reason.offset,
    "io": abi.kvm_run.exit.offset,
    "kvm_valid_regs": abi.kvm_run.kvm_valid_regs.offset,
    "s": abi.kvm_run.s.offset,
}
MEMBERS = {
    "io.port": abi.kvm_run.exit.offset + abi.kvm_run_io.port.offset,
    "io.count": abi.kvm_run.exit.offset + abi.kvm_run_io.count.offset,
    "io.data_offset": abi.kvm_run.exit.offset + abi.kvm_run_io.data_offset.offset,
    "mmio.phys_addr": abi.kvm_run.exit.offset + abi.kvm_run_mmio.phys_addr.offset,
    "mmio.data": abi.kvm_run.exit.offset + abi.kvm_run_mmio.data.offset,
    "mmio.len": abi.kvm_run.exit.offset + abi.kvm_run_mmio.len.offset,
    "mmio.is_write": abi.kvm_run.exit.offset + abi.kvm_run_mmio.is_write.offset,
    "internal.suberror": abi.kvm_run.exit.offset + abi.kvm_run_internal.suberror.offset,
    "internal.data": abi.kvm_run.exit.offset + abi.kvm_run_internal.data.offset,
    "sregs.gdt": abi.kvm_sregs.gdt.offset,
    "sregs.cr0": abi.kvm_sregs.cr0.offset,
    "sregs.efer": abi.kvm_sregs.efer.offset,
    "sregs.interrupt_bitmap": abi.kvm_sregs.interrupt_bitmap.offset,
}


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None or not HEADER.exists():
        pytest.skip("needs gcc and the kernel's uapi headers (apt-get install gcc linux-libc-dev)")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    lines += [f'printf("{name} %lu\\n", (unsigned long)({name}));' for name in IOCTLS]
    lines += [f'printf("{ctype} %zu\\n", sizeof({ctype}));' for ctype in SIZES]
    lines.append('printf("struct kvm_run %zu\\n", sizeof(struct kvm_run));')
    for member in {**OFFSETS, **MEMBERS}:
        struct = "struct kvm_sregs" if member.startswith("sregs.") else "struct kvm_run"
        field = member.removeprefix("sregs.")
        lines.append(f'printf("{member} %zu\\n", offsetof({struct}, {field}));')
    lines += ["return 0;", "}"]
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text("\n".join(lines))
    subprocess.run([gcc, "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in out.splitlines()}


@pytest.mark.parametrize("name", sorted(IOCTLS))
def test_ioctl_numbers_match_the_kernel(name: str, kernel_values: dict[str, int]) -> None:
    assert IOCTLS[name] == kernel_values[name], f"{name}: {IOCTLS[name]:#x}"


@pytest.mark.parametrize("ctype", sorted(SIZES))
def test_struct_sizes_match_the_kernel(ctype: str, kernel_values: dict[str, int]) -> None:
    assert ctypes.sizeof(SIZES[ctype]) == kernel_values[ctype]


def test_kvm_run_layout_matches_the_kernel(kernel_values: dict[str, int]) -> None:
    # Our kvm_run stops after the sync-regs union; the kernel's is that long too.
    assert ctypes.sizeof(abi.kvm_run) == kernel_values["struct kvm_run"]
    for member, offset in {**OFFSETS, **MEMBERS}.items():
        assert offset == kernel_values[member], member


def test_documented_numbers() -> None:
    # The table in frontend-kvm.md §2.4, independently of any header.
    assert abi.KVM_RUN == 0xAE80
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert abi.KVM_SIGNAL_MSI == 0x4020AEA5
    assert abi.KVM_GET_SREGS == 0x8138AE83
    assert abi.KVM_SET_CPUID2 == 0x4008AE90
    assert abi.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert abi.KVM_CREATE_PIT2 == 0x4040AE77


def test_cpuid2_buffer_holds_its_entries() -> None:
    buf = abi.cpuid2_buffer(3)
    entries = abi.cpuid2_entries(buf)
    entries[2].function = 7
    assert len(entries) == 3 and ctypes.sizeof(buf) == 8 + 3 * 40
    assert buf.raw[8 + 80 : 8 + 84] == (7).to_bytes(4, "little")
