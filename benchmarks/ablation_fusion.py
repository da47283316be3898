"""Fusion ablation (the paper's Table I): spatial blocks with masker fusion, gather fusion and scatter-add
fusion switched on one at a time, measured and predicted.

    python benchmarks/ablation_fusion.py                      # predicted for v100 + measured on this CPU
    python benchmarks/ablation_fusion.py --gpu h100 --batch 128 --csv abl.csv    # on a GPU machine

Schedules (rows): ``none`` -- every step unfused (separate masker pool + conv next to conv1; halo tiles
gathered into a buffer, then a dense conv; residual rows gathered, added, activated and scattered back);
``+masker``, ``+gather``, ``+scatter`` -- that one fusion on; ``all`` -- the library's fused path.
Measured: the library's spatial block (``laudnet_ops.nn``, eval, sparse path) with the unfused
composites of ``laudnet_ops.unfused`` swapped in for the ops whose fusion is off; those rows compute
conv1 on every pixel (``masker_conv1x1`` or its composite), while ``all`` is the library's default path
(on a CPU, conv1 on the kept patches' halo after a separate masker). Predicted: the latency
predictor with ``Schedule(fuse_masker=..., fuse_gather=..., fuse_scatter=...)``. The measuring machine
is the CPU unless a GPU is visible (``--measure``); speed-ups are over the fully unfused block, in one run.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _common as C  # noqa: E402
from laudnet_ops import predictor  # noqa: E402

FUSIONS = ("masker", "gather", "scatter")
SCHEDULES = {"none": (), "+masker": ("masker",), "+gather": ("gather",), "+scatter": ("scatter",),
             "all": FUSIONS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--gpu", default="v100", choices=C.PROFILES, help="predictor device profile (default v100)")
    p.add_argument("--block", nargs="+", default=None, help="blocks (default: one per ResNet-101 stage)")
    p.add_argument("--rates", type=C.parse_floats, default=[0.5])
    p.add_argument("--granularity", default=None, help="S, one value or per stage (default 4-4-2-1)")
    p.add_argument("--batch", type=int, default=None, help="prediction (and CUDA) batch; default the profile's")
    p.add_argument("--cpu-batch", type=int, default=8)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--measure", default="cpu", choices=("auto", "none", "cpu", "cuda"),
                   help="default cpu (CUDA when visible)")
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--clock", default="auto", choices=C.CLOCKS,
                   help="CPU timing clock: thread CPU time (needs --threads 1; robust on a loaded machine) "
                        "or wall; auto: thread with one thread, else wall")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--csv", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.dtype = C.dtype_name(args.dtype)
    args.granularity = C.parse_granularity(args.granularity)
    if args.measure == "cpu" and torch.cuda.is_available():
        args.measure = "cuda"
    return args


def schedule(fused):
    return predictor.Schedule(fuse_masker="masker" in fused, fuse_gather="gather" in fused,
                              fuse_scatter="scatter" in fused)


def unfused_names(fused):
    return [op for f in FUSIONS if f not in fused for op in C.FUSION_OPS[f]]


def main(argv=None):
    args = parse_args(argv)
    C.configure_cpu(args.threads, args.clock)
    profile = C.profile(args.gpu)
    measure_on = C.measuring_device(args.measure, args.gpu)
    batch, mbatch = C.batches(args, profile, measure_on)
    machine = C.matching_profile(measure_on) if measure_on != "none" else None
    measurer = None
    if measure_on != "none":
        measurer = C.Measurer(measure_on, mbatch, args.dtype, args.min_run_time)
    blocks = [C.find_block(name) for name in (args.block or C.default_blocks())]
    print(f"ablation_fusion: spatial blocks, predicted for {args.gpu} at batch {batch}"
          + (f", measured on {C.machine_name(measure_on)} at batch {mbatch}" if measurer else ", nothing measured"))
    rows = []
    bar = C.progress(len(blocks) * len(args.rates) * len(SCHEDULES), "ablation_fusion", args.quiet)
    try:
        with torch.no_grad():
            for model, spec in blocks:
                gran = C.stage_granularity(model, "spatial", spec.stage, args.granularity)
                dense_ms = None
                if measurer:
                    dense_ms = min(measurer.dense(model, spec, cl) for cl in (False, True))
                for rate in args.rates:
                    keep = C.block_keep(spec, "spatial", rate, gran)
                    for name, fused in SCHEDULES.items():
                        sched = schedule(fused)
                        p = predictor.predict_block(spec, profile, "spatial", rate, gran, batch, args.dtype, sched)
                        base = dict(block=f"{model}:{spec.name}", mode="spatial", granularity=gran, rate=rate,
                                    schedule=name, fuse_masker="masker" in fused, fuse_gather="gather" in fused,
                                    fuse_scatter="scatter" in fused, keep=keep, dtype=args.dtype)
                        rows.append(dict(device=args.gpu, batch=batch, predicted_ms=p.dynamic * 1e3,
                                         predicted_dense_ms=p.dense * 1e3, **base))
                        if measurer:
                            ms, realised = measurer.dynamic(model, spec, "spatial", gran, keep, unfused_names(fused))
                            mp = None
                            if machine:
                                mp = predictor.predict_block(spec, C.profile(machine), "spatial", rate, gran, mbatch,
                                                             args.dtype, sched)
                            rows.append(dict(device=C.machine_name(measure_on), profile=machine, batch=mbatch,
                                             predicted_ms=mp.dynamic * 1e3 if mp else None,
                                             predicted_dense_ms=mp.dense * 1e3 if mp else None,
                                             measured_ms=ms, measured_dense_ms=dense_ms, realised_keep=realised,
                                             layout="channels_last", **base))
                        bar.update()
    finally:
        bar.close()
    # Speed-up of each schedule over the fully unfused one, per device / block / rate.
    for r in rows:
        ref = next(q for q in rows if q["device"] == r["device"] and q["block"] == r["block"]
                   and q["rate"] == r["rate"] and q["schedule"] == "none")
        for kind in ("predicted", "measured"):
            if r.get(f"{kind}_ms") and ref.get(f"{kind}_ms"):
                r[f"{kind}_vs_unfused"] = ref[f"{kind}_ms"] / r[f"{kind}_ms"]
        for kind in ("predicted", "measured"):
            if r.get(f"{kind}_ms") and r.get(f"{kind}_dense_ms"):
                r[f"{kind}_speedup"] = r[f"{kind}_dense_ms"] / r[f"{kind}_ms"]
    print_table(rows, args)
    if args.csv:
        C.write_csv(args.csv, rows, ("schedule", "fuse_masker", "fuse_gather", "fuse_scatter", "keep", "batch",
                                     "dtype", "predicted_vs_unfused", "measured_vs_unfused", "predicted_speedup",
                                     "measured_speedup", "predicted_dense_ms", "measured_dense_ms", "profile",
                                     "layout", "realised_keep"))
    return 0


def print_table(rows, args):
    print("\neach cell: latency (ms), speed-up over the fully unfused block (x), speed-up over the dense block")
    for rate in args.rates:
        for device in dict.fromkeys(r["device"] for r in rows):
            kind = "predicted" if device == args.gpu else "measured"
            rs = [r for r in rows if r["device"] == device and r["rate"] == rate]
            blocks = list(dict.fromkeys(r["block"] for r in rs))
            print(f"\nrate {rate}, {device} ({kind}, batch {rs[0]['batch']})")
            print(f"  {'schedule':9}{'masker':>7}{'gather':>7}{'scatter':>8}"
                  + "".join(f"{b.split(':')[1]:>22}" for b in blocks) + f"{'sum':>22}")
            for name in SCHEDULES:
                cells = [next(r for r in rs if r["block"] == b and r["schedule"] == name) for b in blocks]
                flags = "".join(f"{('yes' if cells[0][f'fuse_{f}'] else '-'):>{w}}"
                                for f, w in zip(FUSIONS, (7, 7, 8)))
                line = f"  {name:9}{flags}"
                for c in cells:
                    ratio = c.get(f"{kind}_speedup")
                    line += f"{c[f'{kind}_ms']:>11.4g} {c.get(f'{kind}_vs_unfused', 0):>4.2f}x {ratio or 0:>4.2f}"
                total = sum(c[f"{kind}_ms"] for c in cells)
                ref = sum(next(r for r in rs if r["block"] == b and r["schedule"] == "none")[f"{kind}_ms"]
                          for b in blocks)
                dense = [c.get(f"{kind}_dense_ms") for c in cells]
                dsum = sum(dense) if all(dense) else None
                line += f"{total:>11.4g} {ref / total:>4.2f}x " + (f"{dsum / total:>4.2f}" if dsum else "")
                print(line)


if __name__ == "__main__":
    sys.exit(main())
