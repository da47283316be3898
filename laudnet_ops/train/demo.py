"""Demonstration: a static teacher, then its dynamic student, on the bundled real dataset, on a CPU.

    python -m laudnet_ops.train.demo --out runs/demo --report docs/training_demo.md

Phase 1 trains a reduced-width LAUD-ResNet in dense mode (the static teacher) from scratch; phase 2 starts
the dynamic student from the teacher's weights and fine-tunes it with the paper's recipe (Gumbel temperature
5 → 0.1, sparsity loss with relaxing bounds, distillation from the frozen teacher). Everything not given here
is the recipe's default. The report lists teacher and student accuracy and the student's activation rate
and FLOPs ratio against the target, as measured.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .cli import main as train_main


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m laudnet_ops.train.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--report", default=None, help="write a Markdown report here")
    p.add_argument("--dataset", default="auto")
    p.add_argument("--mode", default="spatial", choices=("spatial", "channel", "layer"))
    p.add_argument("--granularity", type=int, nargs="+", default=None)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--width", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--depth", type=int, nargs="+", default=[1, 2, 2])
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--student-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--teacher-lr-per-256", type=float, default=0.2,
                   help="from scratch the teacher needs more than the fine-tuning recipe's 0.02")
    p.add_argument("--student-lr-per-256", type=float, default=0.02)
    p.add_argument("--masker-lr-mult", type=float, default=10.0,
                   help="a few hundred iterations, not 100 ImageNet epochs: the maskers need a faster rate")
    p.add_argument("--train-subset", type=int, default=12000, help="training images (0: all 60 000)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more trainer options for both phases")
    return p.parse_args(argv)


def _list(values):
    return [str(v) for v in values]


def run(argv=None) -> dict:
    a = _args(argv)
    out = Path(a.out)
    common = ["--arch", "small_laud_resnet", "--dataset", a.dataset, "--width", *_list(a.width), "--depth",
              *_list(a.depth), "--batch-size", str(a.batch_size), "--channels-last", "--threads", str(a.threads),
              "--train-subset", str(a.train_subset), *a.extra]
    start = time.perf_counter()
    teacher = ["--mode", "dense", "--epochs", str(a.teacher_epochs), "--lr-per-256", str(a.teacher_lr_per_256),
               "--out", str(out / "teacher")]
    print("== teacher:", " ".join(common + teacher), flush=True)
    t_row = train_main(common + teacher)
    t_seconds = time.perf_counter() - start
    weights = str(out / "teacher" / "last.pt")
    student = ["--mode", a.mode, "--target", str(a.target), "--epochs", str(a.student_epochs), "--lr-per-256",
               str(a.student_lr_per_256), "--masker-lr-mult", str(a.masker_lr_mult), "--init", weights,
               "--teacher", "init", "--out", str(out / "student")]
    if a.granularity:
        student += ["--granularity", *_list(a.granularity)]
    print("== student:", " ".join(common + student), flush=True)
    s_row = train_main(common + student)
    total = time.perf_counter() - start
    result = {
        "teacher_val_acc": t_row["val_acc"], "student_val_acc": s_row["val_acc"],
        "student_activation_rate": s_row["val_activation_rate"], "student_flops_ratio": s_row["val_flops_ratio"],
        "target": a.target, "mode": a.mode, "teacher_seconds": t_seconds, "student_seconds": total - t_seconds,
        "total_seconds": total, "dataset": json.loads((out / "student" / "summary.json").read_text())["dataset"],
        "commands": {"teacher": common + teacher, "student": common + student},
        "load_average_after": os.getloadavg(),
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    report = _report(result, out)
    print(report)
    if a.report:
        Path(a.report).write_text(report)
    return result


def _read_csv(path):
    return path.read_text().strip()


def _report(r: dict, out: Path) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Training demonstration: static teacher → dynamic student",
        "",
        f"Dataset: {r['dataset']} (bundled). Machine: {cpu}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {sys.version.split()[0]}.",
        "",
        "| model | val accuracy | activation rate | FLOPs ratio | target | train time |",
        "|---|---|---|---|---|---|",
        f"| static teacher (dense) | {r['teacher_val_acc']:.4f} | 1.000 | 1.000 | — | {r['teacher_seconds']:.0f} s |",
        f"| dynamic student ({r['mode']}) | {r['student_val_acc']:.4f} | {r['student_activation_rate']:.3f} | "
        f"{r['student_flops_ratio']:.3f} | {r['target']:.2f} | {r['student_seconds']:.0f} s |",
        "",
        f"Total wall time: {r['total_seconds']:.0f} s (load average afterwards "
        f"{', '.join(f'{v:.1f}' for v in r['load_average_after'])}).",
        "",
        "Commands (run by `python -m laudnet_ops.train.demo`):",
        "",
        "```",
        "python -m laudnet_ops.train " + " ".join(r["commands"]["teacher"]),
        "python -m laudnet_ops.train " + " ".join(r["commands"]["student"]),
        "```",
        "",
        "Teacher log (`log.csv`):",
        "",
        "```",
        _read_csv(out / "teacher" / "log.csv"),
        "```",
        "",
        "Student log (`log.csv`):",
        "",
        "```",
        _read_csv(out / "student" / "log.csv"),
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    run(sys.argv[1:])
