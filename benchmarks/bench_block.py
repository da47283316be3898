"""Block benchmark: predicted (and, where this machine can, measured) latency of one residual block,
dense and in each dynamic paradigm, across activation rates.

    python benchmarks/bench_block.py --gpu v100                      # predictions for a V100 (batch 128)
    python benchmarks/bench_block.py --gpu host                      # predict and measure this CPU
    python benchmarks/bench_block.py --gpu v100 --measure cpu        # V100 predictions + CPU measurements
    python benchmarks/bench_block.py --gpu h100 --batch 128 --csv out.csv   # on a GPU machine: CUDA timings
    python benchmarks/bench_block.py --gpu v100 --batch-sweep 1,8,32,128,256 --plot b.png   # paper Fig. 8

``--gpu`` picks the latency predictor's device profile. The blocks are the library's real dynamic blocks
(``laudnet_ops.nn``) in eval with batch norm folded, a seeded random fraction of their units kept
(``force_keep``: the keep ratio whose executed FLOPs are ``rate`` of the dense branch, by the predictor's
own accounting), on the sparse path. Per paradigm:

* fused   -- the library's kernels (masker_conv1x1, gather_conv2d, scatter_add; channel_gated_conv2d;
             sample_gather, sample_scatter_add);
* unfused -- the same block with the spatial / layer ops replaced by their composites of standard
             PyTorch ops (laudnet_ops.unfused: gather tiles -> conv, separate masker, residual gather /
             add / scatter), the paper's Table I baseline;
* dense   -- the dense block (folded batch norm, F.conv2d), measured in NCHW and channels_last; measured
             speed-ups are over the faster of the two.

Measuring happens on CUDA when a GPU is visible (CUDA events, after warm-up), on the CPU with
``--measure cpu`` or when the profile is ``host`` (torch.utils.benchmark, at ``--cpu-batch``). Speed-ups
are ratios of times measured in this one run.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _common as C  # noqa: E402
from laudnet_ops import predictor  # noqa: E402

DEFAULT_RATES = (0.2, 0.4, 0.6, 0.8, 1.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--gpu", default="v100", choices=C.PROFILES, help="predictor device profile (default v100)")
    p.add_argument("--block", nargs="+", default=None,
                   help="blocks, e.g. layer3.1 (ResNet-101) or regnety800mf:s3.b2 "
                        "(default: the second block of each ResNet-101 stage)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch of the predictions and of CUDA measurements (default: the profile's, "
                        "128 for GPUs, 1 for edge devices and the host)")
    p.add_argument("--cpu-batch", type=int, default=8, help="batch of CPU measurements (default 8)")
    p.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
    p.add_argument("--rates", type=C.parse_floats, default=list(DEFAULT_RATES),
                   help="block activation rates (executed / dense FLOPs), e.g. 0.25,0.5,0.75")
    p.add_argument("--modes", default="dense,spatial,channel,layer", help="comma-separated paradigms")
    p.add_argument("--granularity", default=None,
                   help="S for spatial / G for channel: one value, or one per stage (4-4-2-1); "
                        "default: the paper's (S 4-4-2-1, G 2)")
    p.add_argument("--measure", default="auto", choices=("auto", "none", "cpu", "cuda"),
                   help="auto: CUDA when visible, the CPU when --gpu host, else predictions only")
    p.add_argument("--no-unfused", action="store_true", help="skip the unfused composites")
    p.add_argument("--min-run-time", type=float, default=0.1, help="seconds of timing per measurement")
    p.add_argument("--clock", default="auto", choices=C.CLOCKS,
                   help="CPU timing clock: thread CPU time (needs --threads 1; robust on a loaded machine) "
                        "or wall; auto: thread with one thread, else wall")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch-sweep", type=C.parse_floats, default=None,
                   help="also sweep these batch sizes at --sweep-rate: latency per image (paper Fig. 8)")
    p.add_argument("--sweep-rate", type=float, default=0.5)
    p.add_argument("--sweep-max-measured", type=int, default=16,
                   help="measure CPU batch sweeps only up to this batch (CUDA: all)")
    p.add_argument("--csv", default=None, help="write every row to this CSV file")
    p.add_argument("--plot", default=None, help="write speed-up vs rate curves to this PNG "
                                                "(with --batch-sweep also <name>-batch.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.dtype = C.dtype_name(args.dtype)
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in C.MODES:
            p.error(f"unknown mode {m!r}; choose from {C.MODES}")
    if "dense" not in args.modes:
        args.modes.insert(0, "dense")
    args.granularity = C.parse_granularity(args.granularity)
    return args


class Case:
    """One block in one paradigm at one granularity: its predictions and measurements."""

    def __init__(self, model, spec, mode, gran):
        self.model, self.spec, self.mode, self.gran = model, spec, mode, gran


def predict(spec, device, mode, rate, gran, batch, dtype, schedule=predictor.FUSED):
    return predictor.predict_block(spec, C.profile(device), mode, rate, gran, batch, dtype, schedule)


def schedules(mode, with_unfused):
    yield "fused", predictor.FUSED, ()
    if with_unfused and mode in C.UNFUSED_MODES:
        yield "unfused", predictor.UNFUSED, C.all_unfused_names(mode)


def run_rates(args, blocks, profile, batch, measure, measurer, bar):
    """Rows for every block x mode x schedule x rate (predicted for the profile; measured if asked)."""
    rows = []
    machine = C.matching_profile(measure) if measure != "none" else None
    mbatch = measurer.batch if measurer else None
    for model, spec in blocks:
        measured_dense = {}
        base = dict(block=f"{model}:{spec.name}", dtype=args.dtype)
        dense_pred = predict(spec, profile, "dense", 1.0, 1, batch, args.dtype)
        rows.append(dict(device=args.gpu, mode="dense", granularity=1, rate=1.0, schedule="dense", keep=1.0,
                         batch=batch, predicted_ms=dense_pred.dense * 1e3, predicted_speedup=1.0, **base))
        if not measurer:
            bar.update()
        else:
            mdense = predict(spec, machine, "dense", 1.0, 1, mbatch, args.dtype) if machine else None
            for layout, cl in (("nchw", False), ("channels_last", True)):
                ms = measurer.dense(model, spec, cl)
                measured_dense[layout] = ms
                bar.update()
                rows.append(dict(device=C.machine_name(measure), profile=machine, mode="dense", granularity=1,
                                 rate=1.0, schedule="dense", layout=layout, keep=1.0, batch=mbatch,
                                 predicted_ms=mdense.dense * 1e3 if mdense else None, measured_ms=ms, **base))
            best = min(measured_dense.values())
            for r in rows[-2:]:
                r["measured_speedup"] = best / r["measured_ms"]
        for mode in args.modes:
            if mode == "dense":
                continue
            gran = C.stage_granularity(model, mode, spec.stage, args.granularity)
            for rate in args.rates:
                keep = C.block_keep(spec, mode, rate, gran)
                for label, sched, names in schedules(mode, not args.no_unfused):
                    p = predict(spec, profile, mode, rate, gran, batch, args.dtype, sched)
                    rows.append(dict(device=args.gpu, mode=mode, granularity=gran, rate=rate, schedule=label,
                                     keep=keep, batch=batch, predicted_ms=p.dynamic * 1e3,
                                     predicted_speedup=p.speedup, **base))
                    if measurer:
                        ms, realised = measurer.dynamic(model, spec, mode, gran, keep, names)
                        bar.update()
                        mp = predict(spec, machine, mode, rate, gran, mbatch, args.dtype, sched) if machine else None
                        rows.append(dict(device=C.machine_name(measure), profile=machine, mode=mode,
                                         granularity=gran, rate=rate, schedule=label, layout="channels_last",
                                         keep=keep, realised_keep=realised, batch=mbatch,
                                         predicted_ms=mp.dynamic * 1e3 if mp else None,
                                         predicted_speedup=mp.speedup if mp else None, measured_ms=ms,
                                         measured_speedup=min(measured_dense.values()) / ms, **base))
                    if not measurer:
                        bar.update()
    return rows


def run_sweep(args, blocks, profile, measure, measurer, bar):
    """Latency per image vs batch (paper Fig. 8) at ``--sweep-rate``, fused schedule."""
    rows = []
    machine = C.matching_profile(measure) if measure != "none" else None
    for model, spec in blocks:
        base = dict(block=f"{model}:{spec.name}", dtype=args.dtype, experiment="batch_sweep")
        for b in (int(v) for v in args.batch_sweep):
            for mode in args.modes:
                gran = C.stage_granularity(model, mode, spec.stage, args.granularity)
                rate = 1.0 if mode == "dense" else args.sweep_rate
                p = predict(spec, profile, mode, rate, gran, b, args.dtype)
                ms_pred = (p.dense if mode == "dense" else p.dynamic) * 1e3
                rows.append(dict(device=args.gpu, mode=mode, granularity=gran, rate=rate, schedule="fused", batch=b,
                                 predicted_ms=ms_pred, per_image_predicted_ms=ms_pred / b, **base))
                if measurer and (measure == "cuda" or b <= args.sweep_max_measured):
                    if mode == "dense":
                        ms = measurer.dense(model, spec, True, batch=b)
                    else:
                        keep = C.block_keep(spec, mode, rate, gran)
                        ms, _ = measurer.dynamic(model, spec, mode, gran, keep, batch=b)
                    mp = predict(spec, machine, mode, rate, gran, b, args.dtype) if machine else None
                    mp_ms = None if mp is None else (mp.dense if mode == "dense" else mp.dynamic) * 1e3
                    rows.append(dict(device=C.machine_name(measure), profile=machine, mode=mode, granularity=gran,
                                     rate=rate, schedule="fused", layout="channels_last", batch=b,
                                     predicted_ms=mp_ms, measured_ms=ms, per_image_measured_ms=ms / b, **base))
                bar.update()
    return rows


def print_rates(rows, args, profile_batch, measure, mbatch):
    """Per block: speed-up over dense of each paradigm and schedule (rows) at each rate (columns),
    predicted for the profile, then measured on this machine. Times are in the CSV."""
    rate_rows = [r for r in rows if r.get("experiment") is None]
    where = f"measured on {C.machine_name(measure)} at batch {mbatch}" if measure != "none" else "nothing measured"
    print(f"\nspeed-up over dense (dense / dynamic latency) at each activation rate; predicted for {args.gpu} "
          f"at batch {profile_batch}, {args.dtype}; {where}")
    for block in dict.fromkeys(r["block"] for r in rate_rows):
        mine = [r for r in rate_rows if r["block"] == block]
        for device in dict.fromkeys(r["device"] for r in mine):
            rs = [r for r in mine if r["device"] == device]
            dense = {r.get("layout"): r for r in rs if r["mode"] == "dense"}
            if device == args.gpu:
                title = f"{args.gpu}, predicted: dense {dense[None]['predicted_ms']:.4g} ms"
                key = "predicted_speedup"
            else:
                title = (f"{device}, measured: dense {dense['channels_last']['measured_ms']:.4g} ms channels_last, "
                         f"{dense['nchw']['measured_ms']:.4g} ms NCHW")
                key = "measured_speedup"
            measured = device != args.gpu
            if measured:
                title += f" -- measured speed-up (predicted for {rs[0].get('profile')})"
            print(f"\n{block} -- {title}")
            width = 15 if measured else 8
            print(f"  {'paradigm':18}{'S/G':>4}" + "".join(f"{r:>{width}.2f}" for r in args.rates))
            for mode in args.modes:
                for sched in ("fused", "unfused"):
                    cells = {r["rate"]: r for r in rs if r["mode"] == mode and r["schedule"] == sched}
                    if not cells:
                        continue
                    gran = next(iter(cells.values()))["granularity"]
                    vals = "".join(_cell(cells.get(r), key, measured, width) for r in args.rates)
                    print(f"  {mode + ' ' + sched:18}{gran:>4}{vals}")


def _cell(row, key, measured, width):
    if row is None or row.get(key) is None:
        return f"{'-':>{width}}"
    text = f"{row[key]:.2f}x"
    if measured and row.get("predicted_speedup") is not None:
        text += f" ({row['predicted_speedup']:.2f})"
    return f"{text:>{width}}"


def print_sweep(rows, args):
    sweep = [r for r in rows if r.get("experiment") == "batch_sweep"]
    if not sweep:
        return
    print(f"\nlatency per image (ms) vs batch, sum over the blocks, rate {args.sweep_rate} (paper Fig. 8)")
    for device in dict.fromkeys(r["device"] for r in sweep):
        key = "per_image_predicted_ms" if device == args.gpu else "per_image_measured_ms"
        mine = [r for r in sweep if r["device"] == device]
        batches = sorted({r["batch"] for r in mine})
        print(f"  {device} ({'predicted' if device == args.gpu else 'measured'})")
        print("  " + f"{'mode':8}" + "".join(f"{b:>10}" for b in batches))
        for mode in args.modes:
            vals = [sum(r[key] for r in mine if r["mode"] == mode and r["batch"] == b) for b in batches]
            print("  " + f"{mode:8}" + "".join(f"{v:>10.4g}" for v in vals))


def plot(rows, args, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; no plot written", file=sys.stderr)
        return
    rate_rows = [r for r in rows if r.get("experiment") is None and r["mode"] != "dense"]
    blocks = list(dict.fromkeys(r["block"] for r in rate_rows))
    if blocks:
        fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 3.6), squeeze=False)
        colors = {"spatial": "tab:blue", "channel": "tab:orange", "layer": "tab:green"}
        for ax, block in zip(axes[0], blocks):
            for mode in [m for m in args.modes if m != "dense"]:
                for sched, style in (("fused", "-"), ("unfused", ":")):
                    pr = [r for r in rate_rows if r["block"] == block and r["mode"] == mode
                          and r["schedule"] == sched and r["device"] == args.gpu]
                    if pr:
                        ax.plot([r["rate"] for r in pr], [r["predicted_speedup"] for r in pr], style,
                                color=colors[mode], label=f"{mode} {sched} ({args.gpu}, predicted)")
                    mr = [r for r in rate_rows if r["block"] == block and r["mode"] == mode
                          and r["schedule"] == sched and r["device"] != args.gpu]
                    if mr:
                        ax.plot([r["rate"] for r in mr], [r["measured_speedup"] for r in mr], style, marker="o",
                                color=colors[mode], alpha=0.6, label=f"{mode} {sched} (measured)")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_title(block, fontsize=9)
            ax.set_xlabel("activation rate")
            ax.set_ylabel("speed-up over dense")
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")
    sweep = [r for r in rows if r.get("experiment") == "batch_sweep"]
    if sweep:
        stem, ext = os.path.splitext(path)
        spath = f"{stem}-batch{ext or '.png'}"
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for device in dict.fromkeys(r["device"] for r in sweep):
            key = "per_image_predicted_ms" if device == args.gpu else "per_image_measured_ms"
            style = "-" if device == args.gpu else "--"
            for mode in args.modes:
                mine = [r for r in sweep if r["device"] == device and r["mode"] == mode]
                batches = sorted({r["batch"] for r in mine})
                vals = [sum(r[key] for r in mine if r["batch"] == b) for b in batches]
                ax.plot(batches, vals, style, marker=".", label=f"{mode} ({device})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency per image (ms), selected blocks")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(spath, dpi=110)
        plt.close(fig)
        print(f"wrote {spath}")


def main(argv=None):
    args = parse_args(argv)
    C.configure_cpu(args.threads, args.clock)
    torch.manual_seed(0)
    profile = predictor.get_device(args.gpu)
    measure = C.measuring_device(args.measure, args.gpu)
    batch, mbatch = C.batches(args, profile, measure)
    blocks = [C.find_block(name) for name in (args.block or C.default_blocks())]
    measurer = C.Measurer(measure, mbatch, args.dtype, args.min_run_time) if mbatch else None

    print(f"bench_block: profile {args.gpu} ({profile.description}), "
          f"blocks {', '.join(f'{m}:{s.name}' for m, s in blocks)}")
    if measure == "none":
        print("measuring: nothing (no CUDA device; add --measure cpu, or use --gpu host, to time this CPU's "
              "kernels in the same run)")
    else:
        paths = f"; {C.cuda_paths()}" if measure == "cuda" else ""
        print(f"measuring: {C.machine_name(measure)}, batch {mbatch}, torch {torch.__version__}{paths}")

    n_paths = sum(1 + (not args.no_unfused and m in C.UNFUSED_MODES) for m in args.modes if m != "dense")
    total = len(blocks) * (n_paths * len(args.rates) + (2 if measurer else 1))
    if args.batch_sweep:
        total += len(blocks) * len(args.batch_sweep) * len(args.modes)
    bar = C.progress(total, "bench_block", args.quiet)
    try:
        with torch.no_grad():
            rows = run_rates(args, blocks, args.gpu, batch, measure, measurer, bar)
            if args.batch_sweep:
                rows += run_sweep(args, blocks, args.gpu, measure, measurer, bar)
    finally:
        bar.close()
    print_rates(rows, args, batch, measure, mbatch)
    print_sweep(rows, args)
    if args.csv:
        C.write_csv(args.csv, rows, ("schedule", "keep", "batch", "dtype", "predicted_speedup",
                                     "measured_speedup", "profile", "layout", "realised_keep"))
    if args.plot:
        plot(rows, args, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
