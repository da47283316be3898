"""The training loop on tiny data: it learns, it sparsifies, it resumes exactly, it runs distributed."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from laudnet_ops.train.loop import Trainer, param_groups
from laudnet_ops.train.schedules import gumbel_tau

from train_helpers import tiny_config, toy_datasets


def test_training_reduces_the_loss(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=6), datasets=toy_datasets())
    before = trainer.evaluate()
    trainer.fit()
    after = trainer.evaluate()
    assert after["val_loss"] < 0.7 * before["val_loss"]
    rows = trainer.history
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"]
    assert after["val_acc"] > 0.6  # four classes: chance is 0.25


@pytest.mark.parametrize("mode,granularity", [("spatial", (2, 1)), ("layer", None)])
def test_activation_rate_moves_toward_the_target(tmp_path, mode, granularity):
    target = 0.3
    trainer = Trainer(tiny_config(tmp_path, mode=mode, granularity=granularity, target=target, epochs=3),
                      datasets=toy_datasets())
    start = trainer.evaluate()["val_activation_rate"]
    assert start > 0.9  # maskers start biased to keep
    trainer.fit()
    rates = [r["train_activation_rate"] for r in trainer.history]
    assert abs(rates[-1] - target) < 0.75 * abs(start - target)
    assert rates[-1] < rates[0]
    assert trainer.history[-1]["tau"] == pytest.approx(gumbel_tau(trainer.total_steps - 1, trainer.total_steps))


def _state(trainer):
    return {"model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "epoch": trainer.epoch, "step": trainer.step, "rng": torch.get_rng_state()}


def _assert_same_state(a, b):
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"])
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert a["scheduler"]["_last_lr"] == b["scheduler"]["_last_lr"]
    assert torch.equal(a["rng"], b["rng"])


def test_checkpoint_round_trip_restores_every_state(tmp_path):
    cfg = tiny_config(tmp_path, mode="spatial", granularity=(2, 1), epochs=2)
    trainer = Trainer(cfg, datasets=toy_datasets())
    trainer.fit(until=1)
    saved = _state(trainer)
    torch.manual_seed(123)  # disturb the RNG: resuming must restore it
    resumed = Trainer(tiny_config(tmp_path, mode="spatial", granularity=(2, 1), epochs=2, resume="auto"),
                      datasets=toy_datasets())
    _assert_same_state(saved, _state(resumed))
    assert resumed.history == trainer.history


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    kw = dict(mode="layer", epochs=2, teacher=None)
    straight = Trainer(tiny_config(tmp_path / "a", **kw), datasets=toy_datasets())
    straight.fit()
    first = Trainer(tiny_config(tmp_path / "b", **kw), datasets=toy_datasets())
    first.fit(until=1)
    second = Trainer(tiny_config(tmp_path / "b", resume=str(tmp_path / "b" / "last.pt"), **kw),
                     datasets=toy_datasets())
    second.fit()
    _assert_same_state(_state(straight), _state(second))
    rows = (tmp_path / "b" / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[1].startswith("1,") and rows[2].startswith("2,")


def test_student_distils_from_a_teacher_with_the_same_backbone(tmp_path):
    teacher = Trainer(tiny_config(tmp_path / "t", epochs=1), datasets=toy_datasets())
    teacher.fit()
    weights = str(tmp_path / "t" / "last.pt")
    student = Trainer(tiny_config(tmp_path / "s", mode="spatial", granularity=(2, 1), epochs=1, init=weights,
                                  teacher="init", masker_lr_mult=3.0, backbone_lr_mult=0.5),
                      datasets=toy_datasets())
    for name, p in teacher.model.state_dict().items():
        assert torch.equal(student.teacher.state_dict()[name], p)
        assert torch.equal(student.model.state_dict()[name], p)
    groups = {g["name"]: g for g in student.optimizer.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(0.05) and groups["maskers"]["lr"] == pytest.approx(0.3)
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["weight_decay"] == 5e-5 for g in groups.values())
    row = student.fit()
    assert row["train_distill"] > 0 and row["train_sparsity"] > 0
    assert all(not p.requires_grad for p in student.teacher.parameters())


def test_param_groups_separate_maskers():
    from laudnet_ops.train.architectures import SmallLaudResNet

    model = SmallLaudResNet((4, 8), (1, 1), "channel", granularity=2)
    backbone, maskers = param_groups(model, 1.0, 1.0, 2.0, 0.0)
    n_masker = sum(p.numel() for n, p in model.named_parameters() if ".masker." in n)
    assert sum(p.numel() for p in maskers["params"]) == n_masker > 0
    assert len(backbone["params"]) + len(maskers["params"]) == len(list(model.parameters()))


def test_amp_and_channels_last_train(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, mode="spatial", granularity=(2, 1), epochs=1, amp=True,
                                  channels_last=True, max_steps_per_epoch=3), datasets=toy_datasets())
    row = trainer.fit()
    assert trainer.step == 3
    assert torch.isfinite(torch.tensor(row["train_loss"])) and 0 <= row["val_acc"] <= 1
    assert trainer.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, out, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    from laudnet_ops.train.distributed import cleanup_distributed

    try:
        trainer = Trainer(tiny_config(out, mode="layer", epochs=1, threads=1, device="cpu"), datasets=toy_datasets())
        row = trainer.fit()
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        results[rank] = (flat, trainer.step, row["val_acc"])
    finally:
        cleanup_distributed()


def test_ddp_on_two_cpu_processes_keeps_ranks_in_sync(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), results), nprocs=2, join=True)
    (w0, steps0, acc0), (w1, steps1, acc1) = results[0], results[1]
    assert torch.equal(w0, w1)  # DDP averaged the gradients: one model
    assert steps0 == steps1 == 96 // (16 * 2)  # each rank saw its half of the data
    assert acc0 == acc1  # validation numbers are reduced over ranks
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "log.csv").is_file()


def test_load_weights_takes_plain_and_ddp_prefixed_state_dicts(tmp_path):
    from laudnet_ops.train.architectures import SmallLaudResNet, load_weights

    dense = SmallLaudResNet((4, 8), (1, 1), "dense")
    torch.save(dense.state_dict(), tmp_path / "plain.pth")
    torch.save({"model": {"module." + k: v for k, v in dense.state_dict().items()}}, tmp_path / "ddp.pt")
    for name in ("plain.pth", "ddp.pt"):
        student = load_weights(SmallLaudResNet((4, 8), (1, 1), "layer"), str(tmp_path / name))
        for k, v in dense.state_dict().items():
            assert torch.equal(student.state_dict()[k], v)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        load_weights(SmallLaudResNet((4, 8), (1, 1), "dense"), {**dense.state_dict(), "extra.weight": torch.ones(1)})


def test_progress_falls_back_to_lines_without_tqdm(monkeypatch, capsys):
    import sys

    from laudnet_ops.train.loop import _progress

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bar = _progress(20, "epoch 1/1", disable=False)
    for _ in range(20):
        bar.set_postfix_str("loss 0.5")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[-1] == "epoch 1/1 20/20 loss 0.5"
