"""Latency predictor for LAUDNet dynamic networks (paper Sec. 3.3 and Appendix A).

Pure Python: it never imports the compiled extension.  A device (PEs, FP32 lanes, clock, bandwidth,
caches, tensor-core rates) runs each operator as tiles of the output; the predictor searches tile shapes
and prices data movement and computation, then sums kernels into blocks and networks.

    from laudnet_ops.predictor import predict_network, recommend
    net = predict_network("v100", "resnet101", "layer", rate=0.4)
    print(net.dense * 1e3, net.dynamic * 1e3, net.speedup)
"""

from .blocks import EAGER, FUSED, LIBRARY_CPU, MODES, UNFUSED, BlockLatency, BlockSpec, Schedule, predict_block
from .calibrate import Calibration, apply_calibration, calibrate, load_calibration
from .devices import (PAPER_DEVICES, Device, Efficiency, calibration_dir, get_device, known_devices,
                      load_devices, register_device)
from .networks import NetworkLatency, get_model, known_models, network_flops, predict_network
from .plot import latency_curves, plot_curves
from .recommend import Recommendation, recommend
from .tiles import Kernel, KernelCost, price
from .validate import ValidationReport, spearman, validate

__all__ = [
    "BlockLatency", "BlockSpec", "Calibration", "Device", "EAGER", "Efficiency", "FUSED", "Kernel", "LIBRARY_CPU",
    "KernelCost", "MODES", "NetworkLatency", "PAPER_DEVICES", "Recommendation", "Schedule", "UNFUSED",
    "ValidationReport", "apply_calibration", "calibrate", "calibration_dir", "get_device", "get_model",
    "known_devices", "known_models", "latency_curves", "load_calibration", "load_devices", "network_flops",
    "plot_curves", "predict_block", "predict_network", "price", "recommend", "register_device", "spearman",
    "validate",
]
