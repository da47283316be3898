"""Where a dynamic block's time goes on a GPU: its kernels, and the time the GPU waits for the host.

For each block and paradigm (sparse execution in eval, the same kept units every call, channels_last),
a few calls run under torch.profiler. Printed per case:

  wall ms / call      the stream's time per forward, gaps included (CUDA events around the calls)
  kernels ms / call   the summed time of its CUDA kernels, copies and memsets
  idle                1 - kernels / wall: the GPU waits for the host -- launches, and the host
                      synchronisations that read a kept count before sizing the work. The
                      profiler slows the host too: compare it between modes, not with zero.
  syncs / call        host synchronisations per forward (stream, device and event syncs)

and its kernels by total GPU time. The dense block is profiled the same way as the reference.

    python benchmarks/profile_block.py --dtype fp16 --modes dense,spatial,channel,layer
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import laudnet_ops  # noqa: E402

import _common as C  # noqa: E402

# The CUDA runtime calls with which the host waits for the GPU (a blocking read of a kept count is a
# cudaMemcpyAsync followed by a cudaStreamSynchronize).
SYNC_EVENTS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", nargs="+", default=["resnet101:layer1.1", "resnet101:layer3.1"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="fp16", choices=tuple(C.DTYPES))
    p.add_argument("--modes", default="dense,spatial,channel,layer")
    p.add_argument("--granularity", default=None, help="S or G (default: the model's per-stage values)")
    p.add_argument("--rate", type=float, default=0.5, help="executed fraction of the dense branch's FLOPs")
    p.add_argument("--calls", type=int, default=5, help="profiled forwards per case")
    p.add_argument("--rows", type=int, default=8, help="kernels listed per case")
    return p.parse_args(argv)


def block_call(measurer, model, spec, mode, gran, rate):
    """The prepared block's forward, as bench_block times it."""
    if mode == "dense":
        block = C.prepare(measurer.block(model, spec, "dense", 1), "dense", 1.0)
        block = block.to(memory_format=torch.channels_last)
        x = C.block_input(spec, measurer.batch, measurer.device, measurer.dtype, True)
        return lambda: block(x)
    keep = C.block_keep(spec, mode, rate, gran)
    block = C.prepare(measurer.block(model, spec, mode, gran), mode, keep).to(memory_format=torch.channels_last)
    x = C.block_input(spec, measurer.batch, measurer.device, measurer.dtype, True)
    return C.same_masks_every_call(block, lambda: block(x))


def profile_call(fn, calls):
    """(wall ms per call, kernel ms per call, syncs per call, the kernel table)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()  # one cudaEventSynchronize of the profiler's own, not counted below
    wall = start.elapsed_time(end) / calls
    events = prof.key_averages()
    device = gpu_entries(events)
    kernels = sum(e.self_device_time_total for e in device) / 1e3 / calls
    syncs = max(0, sum(e.count for e in events if e.key in SYNC_EVENTS) - 1) / calls
    return wall, kernels, syncs, device


def gpu_entries(events):
    """The GPU-side entries (kernels, copies, memsets) by total time; the CPU ops that launched them are
    left out, so no time counts twice."""
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    return sorted(device, key=lambda e: e.self_device_time_total, reverse=True)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_block: needs a CUDA GPU (none is visible); nothing was profiled")
    if laudnet_ops.extension_error is not None:
        sys.exit(f"profile_block: {laudnet_ops.extension_error}")
    torch.backends.cudnn.benchmark = True
    measurer = C.Measurer("cuda", args.batch, args.dtype, 0.0)
    granularity = C.parse_granularity(args.granularity)
    print(f"device: {torch.cuda.get_device_name()}; batch {args.batch}, {args.dtype}, channels_last, rate "
          f"{args.rate}; {C.cuda_paths()}")
    for name in args.block:
        model, spec = C.find_block(name)
        for mode in args.modes.split(","):
            gran = C.stage_granularity(model, mode, spec.stage, granularity)
            fn = block_call(measurer, model, spec, mode, gran, args.rate)
            with torch.no_grad():
                wall, kernels, syncs, device = profile_call(fn, args.calls)
            idle = max(0.0, 1 - kernels / wall) if wall > 0 else float("nan")
            print(f"\n{model}:{spec.name} {mode} (S/G {gran}): wall {wall:.3f} ms/call, kernels {kernels:.3f} "
                  f"ms/call, GPU idle {100 * idle:.0f}%, {syncs:.1f} host syncs/call")
            for e in device[:args.rows]:
                print(f"  {e.self_device_time_total / 1e3 / args.calls:8.3f} ms  {e.count / args.calls:4.1f}x  "
                      f"{e.key[:100]}")


if __name__ == "__main__":
    main()
