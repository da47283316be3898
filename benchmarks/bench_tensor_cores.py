"""Tensor-core kernels vs their SIMT kernels vs dense cuDNN, with the achieved fraction of roofline.

On a GPU, float16 (or bf16) channels_last, ResNet-50 bottleneck shapes of stage 2 (layer2: 28x28,
width 128) and stage 3 (layer3: 14x14, width 256) at batch 128:

  gather_conv2d         3x3 width->width on half the S=4 patches     vs dense F.conv2d 3x3
  masker_conv1x1        1x1 4*width->width + 1 masker channel         vs dense F.conv2d 1x1
  channel_gated_conv2d  3x3 width->width, half the gate groups on    vs dense F.conv2d 3x3
  conv1x1_scatter_add   fused 1x1 width->4*width + scatter-add        vs F.conv2d + scatter_add_ (unfused)

Each row times the tensor-core kernel (switch on), the SIMT kernel (switch off) and the baseline
with CUDA events (cudnn.benchmark on), and divides the roofline time -- the larger of bytes moved /
peak bandwidth and 2 * MACs / peak fp16 tensor rate -- by the tensor-core time. Peaks come from a
small table keyed on the device name; --peak-tflops / --peak-gbs override it.

    python benchmarks/bench_tensor_cores.py --csv out.csv
"""

import argparse
import csv
import math
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import laudnet_ops  # noqa: E402
from laudnet_ops import _library, reference  # noqa: E402

import _common as C  # noqa: E402

# Dense fp16 tensor-core TFLOP/s (no sparsity) and HBM GB/s from the vendor data sheets.
PEAKS = (
    ("H200", 989.0, 4800.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100", 989.0, 3350.0),  # SXM
    ("A100-SXM4-40GB", 312.0, 1555.0),
    ("A100", 312.0, 2039.0),  # 80 GB
)

STAGES = {"stage2": (28, 128), "stage3": (14, 256)}  # output side, bottleneck width
COLUMNS = ("device", "kernel", "stage", "batch", "dtype", "tc_ms", "simt_ms", "baseline", "baseline_ms",
           "tc_vs_baseline", "tc_speedup_vs_simt", "roofline_ms", "bound", "roofline_fraction", "tc_calls")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    p.add_argument("--stages", default="stage2,stage3")
    p.add_argument("--kernels", default="gather_conv2d,masker_conv1x1,channel_gated_conv2d,conv1x1_scatter_add")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.5, help="fraction of patches / gate groups kept")
    p.add_argument("--group-size", type=int, default=16, help="channel gate group size")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the fp16 tensor-core peak")
    p.add_argument("--peak-gbs", type=float, default=None, help="override the memory bandwidth peak")
    p.add_argument("--min-ms", type=float, default=100.0, help="timed milliseconds per measurement")
    p.add_argument("--kernel-trace", action="store_true",
                   help="also list the CUDA kernels one tensor-core call launches, with their times (torch.profiler)")
    p.add_argument("--ncu", action="store_true",
                   help="no timing: run each tensor-core op twice, for a profiler such as Nsight Compute to attach")
    p.add_argument("--no-simt", action="store_true", help="skip the (slow) SIMT kernels")
    p.add_argument("--csv", default=None)
    return p.parse_args()


def peaks_for(name, args):
    tflops, gbs = None, None
    for key, t, g in PEAKS:
        if key.lower() in name.lower():
            tflops, gbs = t, g
            break
    tflops = args.peak_tflops or tflops
    gbs = args.peak_gbs or gbs
    if tflops is None or gbs is None:
        sys.exit(f"bench_tensor_cores: no peak numbers for {name!r}; pass --peak-tflops and --peak-gbs")
    return tflops, gbs


def time_ms(fn, min_ms):
    """Median milliseconds per call (CUDA events around blocks of calls, the other benchmarks' timer)."""
    return C.time_ms(fn, min_ms / 1e3, "cuda")


def both_paths(fn, args, has_simt=True):
    """(tensor-core ms, SIMT ms, tensor-core calls in one call) of one op call."""
    laudnet_ops.set_tensor_cores(True)
    before = _library._tensor_core_calls()
    fn()
    calls = _library._tensor_core_calls() - before
    tc = time_ms(fn, args.min_ms)
    simt = float("nan")
    if has_simt and not args.no_simt:
        laudnet_ops.set_tensor_cores(False)
        simt = time_ms(fn, args.min_ms)
        laudnet_ops.set_tensor_cores(True)
    return tc, simt, calls


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def patches(N, Ho, S, rate, gen, device):
    Hp = math.ceil(Ho / S)
    mask = torch.rand(N, Hp, Hp, generator=gen) < rate
    return reference.patch_indices(mask).to(device)


def case_gather_conv2d(N, side, width, args, dtype, gen):
    S = args.patch_size
    x = cl(torch.randn(N, width, side, side, generator=gen).to("cuda", dtype))
    w = (torch.randn(width, width, 3, 3, generator=gen) / math.sqrt(9 * width)).to("cuda", dtype)
    b = torch.randn(width, generator=gen).to("cuda", dtype)
    idx = patches(N, side, S, args.rate, gen, "cuda")
    P = idx.shape[0]
    halo = S + 2
    macs = P * S * S * width * width * 9
    size = torch.finfo(dtype).bits // 8
    bytes_moved = size * (P * halo * halo * width + w.numel() + P * S * S * width)
    wcl = cl(w)
    return dict(
        op=lambda: laudnet_ops.gather_conv2d(x, idx, w, b, S, 1, 1),
        baseline_name="cudnn_conv3x3_dense", baseline=lambda: F.conv2d(x, wcl, b, 1, 1),
        macs=macs, bytes=bytes_moved)


def case_masker_conv1x1(N, side, width, args, dtype, gen):
    cin = 4 * width
    x = cl(torch.randn(N, cin, side, side, generator=gen).to("cuda", dtype))
    w = (torch.randn(width, cin, 1, 1, generator=gen) / math.sqrt(cin)).to("cuda", dtype)
    b = torch.randn(width, generator=gen).to("cuda", dtype)
    mw = (torch.randn(1, cin, 1, 1, generator=gen) / math.sqrt(cin)).to("cuda", dtype)
    mb = torch.randn(1, generator=gen).to("cuda", dtype)
    pixels = N * side * side
    size = torch.finfo(dtype).bits // 8
    wcl = cl(w)
    return dict(
        op=lambda: laudnet_ops.masker_conv1x1(x, w, b, mw, mb, args.patch_size, 1),
        baseline_name="cudnn_conv1x1_dense", baseline=lambda: F.conv2d(x, wcl, b),
        macs=pixels * cin * (width + 1), bytes=size * (pixels * (cin + width) + cin * (width + 1)))


def case_channel_gated_conv2d(N, side, width, args, dtype, gen):
    G = args.group_size
    x = cl(torch.randn(N, width, side, side, generator=gen).to("cuda", dtype))
    w = (torch.randn(width, width, 3, 3, generator=gen) / math.sqrt(9 * width)).to("cuda", dtype)
    b = torch.randn(width, generator=gen).to("cuda", dtype)
    gin = (torch.rand(N, width // G, generator=gen) < args.rate).cuda()
    gout = (torch.rand(N, width // G, generator=gen) < args.rate).cuda()
    on_in = gin.sum(1).double() * G
    on_out = gout.sum(1).double() * G
    pixels = side * side
    macs = float((on_in * on_out).sum()) * pixels * 9
    size = torch.finfo(dtype).bits // 8
    bytes_moved = size * (float(on_in.sum()) * pixels + N * pixels * width + width * width * 9)
    wcl = cl(w)
    return dict(
        op=lambda: laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, G, padding=1),
        baseline_name="cudnn_conv3x3_dense", baseline=lambda: F.conv2d(x, wcl, b, 1, 1),
        macs=macs, bytes=bytes_moved)


def case_conv1x1_scatter_add(N, side, width, args, dtype, gen):
    S, cout = args.patch_size, 4 * width
    idx = patches(N, side, S, args.rate, gen, "cuda")
    P = idx.shape[0]
    packed = cl(torch.randn(P, width, S, S, generator=gen).to("cuda", dtype))
    w = (torch.randn(cout, width, 1, 1, generator=gen) / math.sqrt(width)).to("cuda", dtype)
    b = torch.randn(cout, generator=gen).to("cuda", dtype)
    residual = cl(torch.randn(N, cout, side, side, generator=gen).to("cuda", dtype))
    out = residual.clone()
    wcl = cl(w)
    size = torch.finfo(dtype).bits // 8

    def fused():
        # In place on a scratch copy: repeated calls change its values, not the work done.
        torch.ops.laudnet_ops._tensor_core_conv1x1_scatter_add_(out, packed, idx, w, b, "relu")

    def unfused():
        laudnet_ops.scatter_add_(out, F.conv2d(packed, wcl, b), idx, "relu")

    rows = P * S * S
    return dict(
        op=fused, baseline_name="conv2d+scatter_add_", baseline=unfused, has_simt=False,
        macs=rows * width * cout, bytes=size * (rows * width + 2 * rows * cout + cout * width))


def kernel_trace(op, calls=3):
    """The ops and CUDA kernels of ``calls`` tensor-core calls of ``op``, by total GPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    laudnet_ops.set_tensor_cores(True)
    op()
    torch.cuda.synchronize()
    warnings.filterwarnings("ignore", message="Warning: Profiler clears events")  # one cycle is all we use
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            op()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="device_time_total", row_limit=10, max_name_column_width=60)


CASES = {
    "gather_conv2d": case_gather_conv2d,
    "masker_conv1x1": case_masker_conv1x1,
    "channel_gated_conv2d": case_channel_gated_conv2d,
    "conv1x1_scatter_add": case_conv1x1_scatter_add,
}


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_tensor_cores: needs a CUDA GPU (none is visible); nothing was measured")
    if laudnet_ops.extension_error is not None:
        sys.exit(f"bench_tensor_cores: {laudnet_ops.extension_error}")
    if not laudnet_ops.tensor_cores_built():
        sys.exit("bench_tensor_cores: this build has no tensor-core kernels (build with the nvidia-cutlass headers)")
    torch.backends.cudnn.benchmark = True
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    name = torch.cuda.get_device_name()
    tflops, gbs = peaks_for(name, args)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"device: {name}; peaks {tflops:g} TFLOP/s fp16 tensor, {gbs:g} GB/s; batch {args.batch}, {args.dtype}, "
          f"channels_last, rate {args.rate}, S = {args.patch_size}")
    header = (f"{'kernel':<22}{'stage':<8}{'tc ms':>9}{'simt ms':>10}{'baseline':>22}{'base ms':>9}"
              f"{'tc/base':>9}{'roof ms':>9}{'bound':>7}{'roof %':>8}")
    print(header)
    if args.ncu:
        laudnet_ops.set_tensor_cores(True)
        for stage in args.stages.split(","):
            for kernel in args.kernels.split(","):
                case = CASES[kernel](args.batch, *STAGES[stage], args, dtype, gen)
                for _ in range(2):
                    case["op"]()
                torch.cuda.synchronize()
                print(f"ran {kernel} {stage} twice")
        return
    traces = []
    for stage in args.stages.split(","):
        side, width = STAGES[stage]
        for kernel in args.kernels.split(","):
            case = CASES[kernel](args.batch, side, width, args, dtype, gen)
            tc, simt, calls = both_paths(case["op"], args, case.get("has_simt", True))
            base = time_ms(case["baseline"], args.min_ms)
            t_compute = 2 * case["macs"] / (tflops * 1e12) * 1e3
            t_memory = case["bytes"] / (gbs * 1e9) * 1e3
            roof = max(t_compute, t_memory)
            row = dict(device=name, kernel=kernel, stage=stage, batch=args.batch, dtype=args.dtype,
                       tc_ms=round(tc, 4), simt_ms=round(simt, 4), baseline=case["baseline_name"],
                       baseline_ms=round(base, 4), tc_vs_baseline=round(tc / base, 3),
                       tc_speedup_vs_simt=round(simt / tc, 2), roofline_ms=round(roof, 4),
                       bound="compute" if t_compute >= t_memory else "memory",
                       roofline_fraction=round(roof / tc, 3), tc_calls=calls)
            rows.append(row)
            if args.kernel_trace:
                traces.append((f"{kernel} {stage}", kernel_trace(case["op"])))
            print(f"{kernel:<22}{stage:<8}{tc:>9.3f}{simt:>10.3f}{case['baseline_name']:>22}{base:>9.3f}"
                  f"{tc / base:>9.2f}{roof:>9.3f}{row['bound']:>7}{100 * roof / tc:>7.0f}%"
                  + ("" if calls == 1 else "   (WARNING: the tensor-core kernel did not run)"))
    for title, table in traces:
        print(f"\nkernels of one tensor-core call: {title}\n{table}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    print("targets (H100): gather_conv2d tc/base <= 0.60 at rate 0.5, S = 4; fused conv1x1_scatter_add "
          ">= 1.3x faster than conv2d+scatter_add_ (tc/base <= 0.77); every kernel >= 60% of roofline")


if __name__ == "__main__":
    main()
