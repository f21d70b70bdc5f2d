"""Build the freestanding guest test program with the host's gcc.

The flags are the kvm_pvm rules of frontend-kvm.md: no SSE/MMX/popcnt (the
ring-0 instruction emulator refuses some), no red zone, no PIC, no libc.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Final

SOURCE_DIR: Final = Path(__file__).resolve().parent
CFLAGS: Final = (
    "-O2",
    "-march=x86-64",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-no-pie",
    "-static",
    "-mgeneral-regs-only",
    "-mno-sse",
    "-mno-mmx",
    "-mno-popcnt",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-builtin",
    "-Wall",
    "-Werror",
)


class BuildError(RuntimeError):
    pass


def build_pcitest(out_dir: Path, *, flat: bool = False) -> Path:
    """Compile pcitest.c + entry.S into `out_dir`; returns the ELF (or flat binary) path."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError("gcc is not installed (apt-get install gcc)")
    out_dir.mkdir(parents=True, exist_ok=True)
    elf = out_dir / "pcitest.elf"
    command = [
        gcc,
        *CFLAGS,
        "-Wl,-T," + str(SOURCE_DIR / "link.ld"),
        "-Wl,--build-id=none",
        "-o",
        str(elf),
        str(SOURCE_DIR / "entry.S"),
        str(SOURCE_DIR / "pcitest.c"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"building the guest program failed:\n{done.stderr}")
    if not flat:
        return elf
    binary = out_dir / "pcitest.bin"
    objcopy = shutil.which("objcopy") or "objcopy"
    done = subprocess.run(
        [objcopy, "-O", "binary", str(elf), str(binary)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BuildError(f"objcopy failed:\n{done.stderr}")
    return binary
