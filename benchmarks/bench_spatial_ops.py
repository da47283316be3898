"""Spatial-skipping kernels against their dense and unfused baselines, in one run.

gather_conv2d on a ResNet-50 stage-2 3x3 convolution (x (16, 128, 28, 28), 128 -> 128,
padding 1) for S in {1, 2, 4, 7} and kept fractions {0.25, 0.5, 0.75, 1.0}, against the
dense F.conv2d in NCHW and in channels_last (oneDNN's channels_last convolution is the
stronger baseline on CPU), and against the unfused gather -> conv composite.
masker_conv1x1 against the plain 1x1 convolution alone and against the unfused
conv + pool + masker-conv, each in NCHW and channels_last.
masked_conv1x1 (conv1 on the input pixels the 3x3 halo of the kept patches reads, the
CPU spatial blocks' path) on the same shapes with random kept patches, against the plain
1x1 convolution and, with its separate masker (average pool + 1x1 conv) added, against
masker_conv1x1, which computes conv1 densely with the masker fused in.
conv1x1_scatter_add (out of place and in place) against the unfused pair it replaces,
F.conv2d(packed, w3, b3) then scatter_add / scatter_add_, on the ResNet-50 bottlenecks'
last 1x1 convolutions (N=8), each in NCHW and channels_last (the F.conv2d baseline gets
a channels_last weight there; the fused op gets the (Cin, Cout) "taps_major" weight the
blocks pass).

Every time is the median of torch.utils.benchmark's blocked_autorange; ratios are taken
within this one run. The fused op includes its bias and ReLU; the dense baselines are
the bare F.conv2d (no bias, no activation), so the ratios are, if anything, unfavourable
to the fused op.

    python benchmarks/bench_spatial_ops.py [--threads 2] [--csv out.csv] [--device cpu]
        [--only conv1x1_scatter_add] [--rounds 3] [--threads 1 --clock thread]
"""

import argparse
import csv
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import laudnet_ops
from laudnet_ops import unfused
from laudnet_ops.predictor.timing import steady_allocator

CL = torch.channels_last


# Wall clock, or with --threads 1 --clock thread the thread's CPU time, which leaves out the time other
# processes hold the core (the one stable measure on a loaded shared machine; see _common.configure_cpu).
_CLOCK = {"timer": time.perf_counter}


def timeit(fn, min_run_time):
    """Median seconds of fn() (CUDA: synchronised by Timer)."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), timer=_CLOCK["timer"])
    return timer.blocked_autorange(min_run_time=min_run_time).median


def exact_indices(N, Hp, Wp, keep, gen, device):
    """Indices of exactly round(keep * N * Hp * Wp) random patches (at least one)."""
    total = N * Hp * Wp
    count = max(1, round(keep * total))
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=gen)[:count]] = True
    return laudnet_ops.patch_indices(mask.view(N, Hp, Wp).to(device))


def bench_gather_conv(args, rows):
    dev, dt = args.device, torch.float32
    gen = torch.Generator().manual_seed(0)
    N, C, H, W = 16, 128, 28, 28
    x = torch.randn(N, C, H, W, generator=gen).to(dev, dt)
    w = (torch.randn(C, C, 3, 3, generator=gen) / math.sqrt(9 * C)).to(dev, dt)
    b = torch.randn(C, generator=gen).to(dev, dt)
    x_cl, w_cl = x.contiguous(memory_format=CL), w.contiguous(memory_format=CL)
    t_dense_nchw = timeit(lambda: F.conv2d(x, w, None, 1, 1), args.min_run_time)
    t_dense_cl = timeit(lambda: F.conv2d(x_cl, w_cl, None, 1, 1), args.min_run_time)
    print(f"\ngather_conv2d  x {tuple(x.shape)}, 3x3 {C}->{C}, padding 1, {dt}, {args.device}")
    print(f"dense F.conv2d: NCHW {t_dense_nchw * 1e3:.2f} ms, channels_last {t_dense_cl * 1e3:.2f} ms")
    hdr = ("S", "kept", "P", "fused_cl_ms", "fused_nchw_ms", "unfused_cl_ms",
           "fused_cl/dense_cl", "fused_cl/dense_nchw", "fused_nchw/dense_nchw", "unfused_cl/dense_cl")
    print(" ".join(f"{h:>21}" if "/" in h else f"{h:>13}" for h in hdr))
    for S in (1, 2, 4, 7):
        Hp, Wp = math.ceil(H / S), math.ceil(W / S)
        for keep in (0.25, 0.5, 0.75, 1.0):
            idx = exact_indices(N, Hp, Wp, keep, gen, dev)
            t_cl = timeit(lambda: laudnet_ops.gather_conv2d(x_cl, idx, w, b, S, 1, 1), args.min_run_time)
            t_nchw = timeit(lambda: laudnet_ops.gather_conv2d(x, idx, w, b, S, 1, 1), args.min_run_time)
            t_unf = timeit(lambda: unfused.gather_conv2d(x_cl, idx, w_cl, b, S, 1, 1), args.min_run_time)
            r = dict(op="gather_conv2d", S=S, kept=keep, P=idx.shape[0], fused_cl_ms=t_cl * 1e3,
                     fused_nchw_ms=t_nchw * 1e3, unfused_cl_ms=t_unf * 1e3,
                     dense_nchw_ms=t_dense_nchw * 1e3, dense_cl_ms=t_dense_cl * 1e3)
            ratios = (t_cl / t_dense_cl, t_cl / t_dense_nchw, t_nchw / t_dense_nchw, t_unf / t_dense_cl)
            r.update(zip(hdr[6:], ratios))
            rows.append(r)
            print(f"{S:>13} {keep:>13} {idx.shape[0]:>13} {t_cl * 1e3:>13.2f} {t_nchw * 1e3:>13.2f} "
                  f"{t_unf * 1e3:>13.2f} " + " ".join(f"{v:>21.3f}" for v in ratios))
            sys.stdout.flush()


def bench_masker(args, rows):
    dev, dt = args.device, torch.float32
    gen = torch.Generator().manual_seed(1)
    # A stage-2 bottleneck (stride 1) and the stage's first, strided block.
    for (N, Cin, H, W, Cout, S, stride) in ((16, 512, 28, 28, 128, 4, 1), (16, 256, 56, 56, 128, 4, 2)):
        M = 1
        x = torch.randn(N, Cin, H, W, generator=gen).to(dev, dt)
        w = (torch.randn(Cout, Cin, 1, 1, generator=gen) / math.sqrt(Cin)).to(dev, dt)
        b = torch.randn(Cout, generator=gen).to(dev, dt)
        wm = (torch.randn(M, Cin, 1, 1, generator=gen) / math.sqrt(Cin)).to(dev, dt)
        bm = torch.randn(M, generator=gen).to(dev, dt)
        print(f"\nmasker_conv1x1  x {tuple(x.shape)}, 1x1 {Cin}->{Cout} + {M} masker channel, S={S}, "
              f"stride={stride}, {dt}, {args.device}")
        for layout in ("nchw", "channels_last"):
            xl = x if layout == "nchw" else x.contiguous(memory_format=CL)
            wl = w if layout == "nchw" else w.contiguous(memory_format=CL)
            wml = wm if layout == "nchw" else wm.contiguous(memory_format=CL)
            t_plain = timeit(lambda: F.conv2d(xl, wl), args.min_run_time)
            t_fused = timeit(lambda: laudnet_ops.masker_conv1x1(xl, w, b, wm, bm, S, stride), args.min_run_time)
            t_unf = timeit(lambda: unfused.masker_conv1x1(xl, wl, b, wml, bm, S, stride), args.min_run_time)
            r = dict(op="masker_conv1x1", layout=layout, shape=f"{N}x{Cin}x{H}x{W}->{Cout}", S=S, stride=stride,
                     plain_conv_ms=t_plain * 1e3, fused_ms=t_fused * 1e3, unfused_ms=t_unf * 1e3,
                     **{"fused/plain": t_fused / t_plain, "fused/unfused": t_fused / t_unf})
            rows.append(r)
            print(f"  {layout:>13}: plain 1x1 conv {t_plain * 1e3:7.2f} ms | fused {t_fused * 1e3:7.2f} ms | "
                  f"unfused conv+pool+masker {t_unf * 1e3:7.2f} ms | fused/plain {t_fused / t_plain:.3f} | "
                  f"fused/unfused {t_fused / t_unf:.3f}")
            sys.stdout.flush()


def bench_masked_conv1x1(args, rows):
    dev, dt = args.device, torch.float32
    gen = torch.Generator().manual_seed(3)
    for (N, Cin, H, W, Cout, S, stride) in ((16, 512, 28, 28, 128, 4, 1), (16, 256, 56, 56, 128, 4, 2)):
        x = torch.randn(N, Cin, H, W, generator=gen).to(dev, dt).contiguous(memory_format=CL)
        w = (torch.randn(Cout, Cin, 1, 1, generator=gen) / math.sqrt(Cin)).to(dev, dt)
        b = torch.randn(Cout, generator=gen).to(dev, dt)
        wm = (torch.randn(1, Cin, 1, 1, generator=gen) / math.sqrt(Cin)).to(dev, dt)
        bm = torch.randn(1, generator=gen).to(dev, dt)
        wt, wl, wml = _taps_major(w), w.contiguous(memory_format=CL), wm.contiguous(memory_format=CL)
        out_hw = (-(-H // stride), -(-W // stride))
        grid = (N, -(-out_hw[0] // S), -(-out_hw[1] // S))
        print(f"\nmasked_conv1x1  x {tuple(x.shape)} channels_last, 1x1 {Cin}->{Cout}, random patches of S={S} "
              f"at stride {stride}, {dt}, {args.device}")
        window = S * stride
        for keep in (0.25, 0.5, 0.75):
            mask = torch.rand(grid, generator=gen).to(dev) < keep
            read = laudnet_ops.nn.halo_mask(mask, S, stride, (H, W), out_hw)[:, 0]
            density = read.float().mean().item()
            t_plain, t_masked, t_masker, t_fused = _interleaved_ms([
                lambda: F.conv2d(x, wl),
                lambda: laudnet_ops.masked_conv1x1(x, read, wt, b),
                lambda: F.conv2d(F.avg_pool2d(x, window, window, ceil_mode=True), wml, bm),
                lambda: laudnet_ops.masker_conv1x1(x, wt, b, wm, bm, S, stride),
            ], args)
            r = dict(op="masked_conv1x1", layout="channels_last", shape=f"{N}x{Cin}x{H}x{W}->{Cout}", S=S,
                     stride=stride, keep=keep, read_fraction=density, plain_conv_ms=t_plain, masked_ms=t_masked,
                     masker_ms=t_masker, masker_conv1x1_ms=t_fused,
                     **{"masked/plain": t_masked / t_plain,
                        "(masker+masked)/masker_conv1x1": (t_masker + t_masked) / t_fused})
            rows.append(r)
            print(f"  keep {keep:.2f}, {density:.2f} of the pixels read: plain 1x1 conv {t_plain:7.2f} ms | "
                  f"masked {t_masked:7.2f} ms | masker {t_masker:5.2f} ms | masker_conv1x1 {t_fused:7.2f} ms | "
                  f"masked/plain {t_masked / t_plain:.3f} | (masker+masked)/masker_conv1x1 "
                  f"{(t_masker + t_masked) / t_fused:.3f}")
            sys.stdout.flush()


def _taps_major(w):
    """The (Cin, Cout)-ordered weight the blocks pass for channels_last maps (nn/folding.py)."""
    return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _interleaved_ms(fns, args):
    best = [float("inf")] * len(fns)
    for _ in range(args.rounds):
        for k, fn in enumerate(fns):
            best[k] = min(best[k], timeit(fn, args.min_run_time) * 1e3)
    return best


def bench_conv1x1_scatter(args, rows):
    dev, dt = args.device, torch.float32
    gen = torch.Generator().manual_seed(2)
    N = 8
    print(f"\nconv1x1_scatter_add vs F.conv2d(packed, w3, b3) + scatter_add[_], N={N}, {dt}, {args.device}")
    hdr = ("layout", "map", "Cin->Cout", "S", "kept", "P", "fused_ms", "unfused_ms", "fused_/ms", "unfused_/ms",
           "fused/unfused", "fused_/unfused_")
    print(" ".join(f"{h:>15}" for h in hdr))
    for (H, Cin, Cout, S) in ((56, 64, 256, 4), (28, 128, 512, 4), (14, 256, 1024, 2), (7, 512, 2048, 1)):
        Hp = math.ceil(H / S)
        w = (torch.randn(Cout, Cin, 1, 1, generator=gen) / math.sqrt(Cin)).to(dev, dt)
        b = torch.randn(Cout, generator=gen).to(dev, dt)
        res = torch.relu(torch.randn(N, Cout, H, H, generator=gen)).to(dev, dt)
        for keep in (0.25, 0.5, 1.0):
            idx = exact_indices(N, Hp, Hp, keep, gen, dev)
            pk = torch.randn(idx.shape[0], Cin, S, S, generator=gen).to(dev, dt)
            for layout in ("nchw", "channels_last"):
                fmt = CL if layout == "channels_last" else torch.contiguous_format
                pk_l, res_l = pk.contiguous(memory_format=fmt), res.contiguous(memory_format=fmt)
                w_fused = _taps_major(w) if layout == "channels_last" else w
                w_conv = w.contiguous(memory_format=fmt)
                work = res_l.clone()  # the in-place forms keep adding into it: fine for timing
                fns = (
                    lambda: laudnet_ops.conv1x1_scatter_add(res_l, pk_l, idx, w_fused, b),
                    lambda: laudnet_ops.scatter_add(res_l, F.conv2d(pk_l, w_conv, b), idx),
                    lambda: laudnet_ops.conv1x1_scatter_add_(work, pk_l, idx, w_fused, b),
                    lambda: laudnet_ops.scatter_add_(work, F.conv2d(pk_l, w_conv, b), idx),
                )
                # Interleaved rounds, the fastest kept: load drift on a shared machine stays out of the ratios.
                t = _interleaved_ms(fns, args)
                r = dict(op="conv1x1_scatter_add", layout=layout, map=f"{H}x{H}", shape=f"{Cin}->{Cout}", S=S,
                         kept=keep, P=idx.shape[0], fused_ms=t[0], unfused_ms=t[1], fused_inplace_ms=t[2],
                         unfused_inplace_ms=t[3], **{"fused/unfused": t[0] / t[1],
                                                     "fused_/unfused_": t[2] / t[3]})
                rows.append(r)
                print(f"{layout:>15} {H:>12}x{H:<2} {f'{Cin}->{Cout}':>15} {S:>15} {keep:>15} {idx.shape[0]:>15} "
                      + " ".join(f"{v:>15.3f}" for v in t) + f" {t[0] / t[1]:>15.3f} {t[2] / t[3]:>15.3f}")
                sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--only", choices=("gather_conv2d", "masker_conv1x1", "masked_conv1x1", "conv1x1_scatter_add"),
                        default=None)
    parser.add_argument("--rounds", type=int, default=3,
                        help="masked_conv1x1, conv1x1_scatter_add: interleaved timing rounds, the fastest kept")
    parser.add_argument("--csv", default=None, help="write every row to this CSV file")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="CPU timings: wall time, or (with --threads 1) the thread's CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steady_allocator()  # steady-state latencies for every variant, whatever ran before
    if args.clock == "thread":
        if args.threads != 1 or args.device != "cpu":
            raise SystemExit("--clock thread needs --threads 1 on the CPU (it times the calling thread only)")
        _CLOCK["timer"] = time.thread_time
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.clock} clock, device {args.device}")
    rows = []
    with torch.no_grad():
        if args.only in (None, "gather_conv2d"):
            bench_gather_conv(args, rows)
        if args.only in (None, "masker_conv1x1"):
            bench_masker(args, rows)
        if args.only in (None, "masked_conv1x1"):
            bench_masked_conv1x1(args, rows)
        if args.only in (None, "conv1x1_scatter_add"):
            bench_conv1x1_scatter(args, rows)
    if args.csv:
        keys = sorted({k for r in rows for k in r})
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
