"""Where networks run and in what precision: one place for the device and autocast rules,
shared by training, evaluation and inference (so all three run a network the same way)."""

from __future__ import annotations

import contextlib
import os
import resource

import torch

from medpipe.errors import MedpipeError


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA when torch sees a GPU, else the CPU; asking for CUDA without one is an
    error rather than a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise MedpipeError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MedpipeError(f"device {name!r} was asked for, but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MedpipeError(f"device {name!r} was asked for, but torch sees "
                               f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MedpipeError("device 'mps' was asked for, but torch sees no MPS device")
    return device


def loader_workers(setting: int | None, device: torch.device) -> int:
    """SETTING, or when None the loader processes for DEVICE: on a GPU every core but two
    (the training loop and the system), at most 12 as nnU-Net's default (it reports an A100
    waiting on data with 8); on a CPU one: there the network's threads need the cores."""
    if setting is not None:
        return setting
    if device.type != "cuda":
        return 1
    return max(1, min(12, len(os.sched_getaffinity(0)) - 2))


def autocast_dtype(device: torch.device, amp: bool, choice: str = "auto") -> torch.dtype | None:
    """bf16 where the GPU computes it natively (no loss scaling needed), else fp16 (with
    the engine's GradScaler). On a CPU, bf16
    only where it has native bf16 instructions (AVX-512 BF16 or AMX): measured on such an
    AMD EPYC (2 cores), a VoxelMorph training step at 64x80x64 ran 2.3x faster and its
    inference 2.4x faster than fp32, a DynUNet step (2 x 80x80x64) 1.8x and its inference
    1.8x (`bench/autocast_cpu.py`);
    without them bf16 is emulated and slower, so fp32."""
    if not amp:
        return None
    if choice != "auto":  # forced: "bf16" or "fp16"
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    if device.type == "cuda":  # native bf16 from Ampere (compute capability 8.0) on;
        # `torch.cuda.is_bf16_supported()` also counts the emulation of a T4 or V100
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (torch's own CPU capability probes; private
    helpers, so a torch without them counts as no)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` for DTYPE on DEVICE, or nothing when DTYPE is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def available_memory(device: torch.device | None = None) -> float | None:
    """Bytes DEVICE can still give: free GPU memory, or the machine's MemAvailable (Linux);
    None where unknown."""
    if device is not None and device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def require_memory(needed: float, device: torch.device, what: str) -> None:
    """Refuse, with a message, work that cannot fit (rather than be killed half-way):
    NEEDED bytes is a lower bound of what WHAT takes on DEVICE."""
    available = available_memory(device)
    if available is not None and needed > available:
        where = "GPU" if device.type == "cuda" else "this machine"
        raise MedpipeError(f"{what} needs at least {needed / 2**30:.1f} GiB and {where} has "
                           f"{available / 2**30:.1f} GiB available")


def host_description(device: torch.device, dtype: torch.dtype | None) -> str:
    """The machine a run's costs were measured on, for run tags: the device, for a CPU its
    model, widest vector unit and threads, and the precision the network ran in. Training
    minutes compare only between runs of one description (a study run in parts may span
    machines). The vector unit is named because a cloud CPU's model is often only "AMD
    EPYC", and one with AVX-512 trains about twice as fast as one with AVX2 alone."""
    import platform

    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {precision}"
    if device.type == "mps":
        return f"Apple GPU ({platform.machine()}), {precision}"
    model = cpu_field("model name") or platform.processor() or platform.machine()
    vector = cpu_vector_unit()
    model = f"{model} ({vector})" if vector else model
    return f"{model}, {torch.get_num_threads()} threads, {precision}"


def cpu_vector_unit() -> str | None:
    """The CPU's widest x86 vector unit ("AVX-512", "AVX2"; None where neither or not
    Linux): it decides CPU training speed more than the core count does."""
    flags = (cpu_field("flags") or "").split()
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None


def cpu_field(name: str) -> str | None:
    """A field of /proc/cpuinfo's first processor (None where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def device_name(device: torch.device) -> str:
    """What the device is, for run tags: the GPU's model, or "cpu"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
