"""Describe the CUDA device torch sees, so ``calibrate`` / ``validate`` can run on a GPU."""

from __future__ import annotations

from .devices import MB, Device, get_device

#: Substrings of torch.cuda.get_device_name() mapped to built-in datasheet devices.
_NAMES = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("V100", "v100"), ("3090", "rtx3090"),
          ("3060", "rtx3060"))


def detect_cuda_device(device: str = "cuda") -> Device:
    """The built-in device matching the GPU's name (SM count taken from the driver), or a generic one
    built from the driver's properties (128 FP32 lanes per SM and 1.5 GHz assumed; calibrate refines)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available to torch")
    props = torch.cuda.get_device_properties(torch.device(device))
    for needle, name in _NAMES:
        if needle in props.name:
            base = get_device(name, calibration=False)
            return base.replace(name=f"cuda-{name}", description=f"{props.name} (measured)",
                                num_pe=props.multi_processor_count)
    l2 = getattr(props, "L2_cache_size", 4 * MB)
    return Device(name="cuda", description=f"{props.name} (generic description)", kind="gpu",
                  num_pe=props.multi_processor_count, fp32_per_pe=128, clock_mhz=1500.0, dram_gbs=1000.0,
                  onchip_bytes=int(l2), pe_mem_bytes=100 * 1024, txn_bytes=32,
                  sources=("torch.cuda.get_device_properties; lanes, clock and bandwidth assumed",))
