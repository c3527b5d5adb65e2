"""Does this machine compute bf16 natively? What `--precision auto` picks, and the bf16 warning.

bf16 autocast is only fast where the hardware multiplies bf16: a GPU with bf16 (Ampere and
later), or a CPU with AMX (Intel Sapphire Rapids and later) or AVX512-BF16 (Intel Cooper Lake,
AMD Zen 4 and later). Elsewhere (an AVX2-only CPU such as AMD EPYC Zen 2/3) every bf16 matmul is
emulated by converting to fp32 and back, and a run is many times slower than plain fp32.

Import-light: torch is imported only by `detect`, so the config modules can name PRECISIONS.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "auto")
HELP = ("compute precision: bf16 = autocast over fp32 master weights, faster only where the hardware has bf16 "
        "(GPU, AMX or AVX512-BF16 CPU; elsewhere many times slower); auto = bf16 there, else fp32")

NATIVE_GPU = "bf16 native (GPU)"
NATIVE_AMX = "bf16 native (AMX)"
NATIVE_AVX512 = "bf16 native (AVX512-BF16)"
NATIVE_ARM = "bf16 native (Arm BF16)"
EMULATED = "bf16 emulated (slow)"


@dataclass(frozen=True)
class Machine:
    capability: str  # torch's ATen CPU capability: AVX2, AVX512, ... (its elementwise kernels)
    flags: frozenset  # CPU feature flags, as /proc/cpuinfo names them
    cuda: bool = False  # runs use a CUDA GPU
    cuda_bf16: bool = False  # ... that has bf16 in hardware


def verdict(m: Machine) -> str:
    """How this machine runs bf16 matmuls. The flags decide on a CPU, not the ATen capability:
    matmuls go through oneDNN, which uses AMX / AVX512-BF16 whenever the CPU has them, even when
    ATEN_CPU_CAPABILITY=avx2 holds ATen's own kernels back."""
    if m.cuda:
        return NATIVE_GPU if m.cuda_bf16 else EMULATED
    if "amx_bf16" in m.flags:
        return NATIVE_AMX
    if "avx512_bf16" in m.flags or "AVX512_BF16" in m.capability.upper():
        return NATIVE_AVX512
    if "bf16" in m.flags:  # aarch64's Features line (BFMMLA / BFDOT: Graviton 3, Neoverse V1+)
        return NATIVE_ARM
    return EMULATED


def describe(m: Machine) -> str:
    device = "GPU" if m.cuda else f"CPU, ATen {m.capability or 'unknown'}"
    return f"{verdict(m)} on this {device}"


def resolve(requested: str, m: Machine) -> str:
    """The concrete precision of `requested`: auto is bf16 where bf16 is native (measured: a bf16
    matmul ~2.2x faster than fp32 on a Zen 4 with AVX512-BF16, more with AMX or a GPU), else fp32.
    Step 1 is exactly the zero-log-ratio loss in either (tests/test_step_one.py)."""
    if requested != "auto":
        return requested
    return "fp32" if verdict(m) == EMULATED else "bf16"


def messages(requested: str, m: Machine) -> list[str]:
    """The lines a run prints about its precision: auto's choice and why; a warning for bf16 where it
    is emulated. Nothing for a native bf16 or an explicit fp32."""
    chosen = resolve(requested, m)
    lines = []
    if requested == "auto":
        lines.append(f"precision auto -> {chosen}: {describe(m)}")
    elif chosen == "bf16" and verdict(m) == EMULATED:
        where = "GPU" if m.cuda else "CPU"
        lines.append(f"warning: bf16 on this {where} is emulated: expect it to be much slower than fp32; "
                     f"use --precision auto or fp32")
    return lines


def _cpuinfo(keys: tuple[str, ...], path: str = "/proc/cpuinfo") -> str | None:
    """The value of the first /proc/cpuinfo line whose key is one of `keys` (None: no such line, not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return None


def _proc_flags(path: str = "/proc/cpuinfo") -> set:
    # Not Linux: torch's own CPU probe in detect() still answers for x86.
    return set((_cpuinfo(("flags", "Features"), path) or "").split())  # x86, aarch64


def cpu_name() -> str:
    """The CPU's model name, for benchmark reports."""
    import platform

    return _cpuinfo(("model name",)) or platform.processor() or platform.machine()


@functools.cache
def detect() -> Machine:
    """This process's machine (cached: the hardware does not change during a run)."""
    import torch

    flags = _proc_flags()
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    for flag, probe in probes.items():  # cpuinfo's view, for machines without /proc/cpuinfo
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            flags.add(flag)
    cuda = torch.cuda.is_available()
    # including_emulation=False: torch otherwise says True on pre-Ampere GPUs that emulate bf16.
    cuda_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    return Machine(torch.backends.cpu.get_cpu_capability(), frozenset(flags), cuda, cuda_bf16)


def concrete(requested: str) -> str:
    """`requested` with auto resolved for this machine, silently (fingerprints, autocast)."""
    return requested if requested != "auto" else resolve(requested, detect())


def announce(requested: str, say=None) -> str:
    """Resolve `requested` for this machine, telling the user (auto's choice; bf16's warning) through
    `say`, by default on stderr."""
    say = say or functools.partial(print, file=sys.stderr, flush=True)
    m = detect()
    for line in messages(requested, m):
        say(line)
    return resolve(requested, m)
