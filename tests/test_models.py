"""LAUD models: torchvision weights load, force_keep limits, stats, training, torch.compile."""

import pytest
import torch
from torch import nn

from laudnet_ops.models import (
    LaudResNet,
    laud_regnety_400mf,
    laud_regnety_800mf,
    laud_resnet50,
    laud_resnet101,
    load_backbone,
)
from laudnet_ops.nn import set_execution, set_force_keep, sparsity_loss, stats
from laudnet_ops.nn.blocks import DynamicBlock

from laudnet_ops.nn.blocks import missing_sparse_ops
from test_nn_blocks import needs_sparse_ops, randomize_bn

MODES = ["dense", "spatial", "channel", "layer"]
FACTORIES = {
    "resnet50": laud_resnet50,
    "resnet101": laud_resnet101,
    "regnet_y_400mf": laud_regnety_400mf,
    "regnet_y_800mf": laud_regnety_800mf,
}


def _input(seed=0, size=64):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def torchvision_model():
    tv = pytest.importorskip("torchvision")
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = randomize_bn(getattr(tv.models, name)()).eval()
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(FACTORIES))
def test_torchvision_state_dict_loads_and_only_maskers_are_extra(name, torchvision_model):
    reference = torchvision_model(name).state_dict()
    model = FACTORIES[name](mode="spatial")
    result = model.load_state_dict(reference, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".masker." in k for k in result.missing_keys)
    for key, value in reference.items():
        assert torch.equal(model.state_dict()[key], value), key
    for mode in ("dense", "channel", "layer"):
        keys = {k for k in FACTORIES[name](mode=mode).state_dict() if ".masker." not in k}
        assert keys == set(reference)


@pytest.mark.parametrize("name", ["resnet50", "regnet_y_400mf"])
@pytest.mark.parametrize("mode", MODES)
def test_force_keep_one_equals_torchvision(name, mode, torchvision_model):
    reference = torchvision_model(name)
    model = load_backbone(FACTORIES[name](mode=mode, force_keep=1.0), reference.state_dict()).eval()
    x = _input()
    with torch.no_grad():
        expected = reference(x)
        set_execution(model, "masked")
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        needs_sparse_ops(mode)
        set_execution(model, "sparse")
        # Folded batch norm and the kernels' own summation order, through 50 layers in float32.
        atol = 1e-3 * expected.abs().max().item()
        torch.testing.assert_close(model(x), expected, atol=atol, rtol=1e-3)


def test_state_dict_round_trip_between_modes():
    torch.manual_seed(0)
    source = randomize_bn(laud_regnety_400mf(mode="channel"))
    target = laud_regnety_400mf(mode="channel")
    target.load_state_dict(source.state_dict())
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        load_backbone(laud_regnety_400mf(mode="dense"), source.state_dict())


def _small(net, mode):
    if net == "resnet":
        return LaudResNet((1, 1, 1, 1), mode=mode, num_classes=10)
    from laudnet_ops.models.regnet import LaudRegNetY
    return LaudRegNetY((1, 1, 1, 1), (16, 32, 48, 64), 8, mode=mode, granularity=4, num_classes=10)


@pytest.mark.parametrize("net", ["resnet", "regnet"])
@pytest.mark.parametrize("mode", MODES)
def test_inference_path_computes_channels_last_on_the_cpu(net, mode):
    # An NCHW input: the sparse (inference) path lays it out channels_last, the masked path keeps it.
    needs_sparse_ops(mode)
    torch.manual_seed(1)
    model = randomize_bn(_small(net, mode)).eval()
    set_force_keep(model, 1.0)
    stem_out = model.maxpool if net == "resnet" else model.stem
    maps = []
    stem_out.register_forward_hook(lambda module, inputs, output: maps.append(output))
    x = _input()
    with torch.no_grad():
        set_execution(model, "sparse")
        sparse = model(x)
        set_execution(model, "masked")
        masked = model(x)
    assert maps[0].is_contiguous(memory_format=torch.channels_last) and not maps[0].is_contiguous()
    assert maps[1].is_contiguous()
    torch.testing.assert_close(sparse, masked, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("net", ["resnet", "regnet"])
def test_a_model_made_under_inference_mode_folds_its_current_weights(net):
    # Parameters made under torch.inference_mode carry no version counter: a load_state_dict there
    # must still reach the folded weights of the inference path.
    torch.manual_seed(2)
    reference = randomize_bn(_small(net, "dense")).eval()
    x = _input()
    with torch.inference_mode():
        model = _small(net, "dense").eval()
        model(x)  # folds the initial weights
        model.load_state_dict(reference.state_dict())
        got = model(x)
    with torch.no_grad():
        want = reference(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_default_granularities():
    assert laud_resnet50(mode="spatial").granularity == (4, 4, 2, 1)
    assert laud_resnet50(mode="channel").granularity == (4, 4, 4, 4)
    model = laud_resnet50(mode="spatial", granularity=(8, 4, 7, 1))
    assert model.layer3[0].masker.patch_size == 7
    with pytest.raises(ValueError, match="one value per stage"):
        laud_resnet50(mode="spatial", granularity=(4, 2))


def _tiny_resnet(mode, **kw):
    torch.manual_seed(0)
    return randomize_bn(LaudResNet((1, 2, 1, 1), mode=mode, num_classes=10, **kw))


@pytest.mark.parametrize("mode", MODES[1:])
def test_force_keep_zero_skips_every_residual_branch(mode):
    model = _tiny_resnet(mode, force_keep=0.0).eval()
    set_execution(model, "masked")
    model(_input(size=32))
    s = stats(model)
    for name, block in s["blocks"].items():
        assert block["keep"] == 0.0, name
    # With every branch off a block's FLOPs are its shortcut and masker only.
    for block in (m for m in model.modules() if isinstance(m, DynamicBlock)):
        parts = block._laud_record.parts
        executed = stats(block)["flops"]
        assert executed == pytest.approx(2 * (parts.get("downsample", 0) + parts["masker"]))


@pytest.mark.parametrize("mode", MODES)
def test_stats_report_every_block_and_a_model_ratio(mode):
    model = laud_resnet50(mode=mode, force_keep=0.5).eval()
    set_execution(model, "masked")
    with torch.no_grad():
        model(_input(size=64))
    s = stats(model)
    assert len(s["blocks"]) == 16
    assert s["dense_flops"] > sum(b["dense_flops"] for b in s["blocks"].values())  # stem and head
    ratio = float(s["flops_ratio"])
    if mode == "dense":
        assert ratio == 1.0 and s["activation_rate"] == 1.0
    else:
        assert 0.3 < ratio < 0.9 and 0.3 < s["activation_rate"] < 0.9
        assert all(0.1 < b["keep"] < 0.9 or b["keep"] in (0.0, 1.0) for b in s["blocks"].values())


@pytest.mark.parametrize("factory", [_tiny_resnet, lambda mode: laud_regnety_400mf(mode=mode, num_classes=10)])
@pytest.mark.parametrize("mode", MODES[1:])
def test_training_step_reaches_every_masker(factory, mode):
    model = factory(mode).train()
    logits = model(_input(size=32))
    loss = nn.functional.cross_entropy(logits, torch.tensor([1, 2])) + sparsity_loss(model, progress=0.5)
    loss.backward()
    for name, module in model.named_modules():
        if isinstance(module, DynamicBlock):
            grads = [p.grad for p in module.masker.parameters()]
            assert all(g is not None for g in grads), name
            assert any(g.abs().sum() > 0 for g in grads), name


def test_sparsity_loss_pulls_to_the_target():
    model = _tiny_resnet("layer").train()
    model(_input(size=32))
    s = stats(model)
    loss = sparsity_loss(model, progress=0.0, target=0.5)
    # At the start the band is [t, t]; at the end of the warm-up [0, 1] and only the ratio term is left.
    r = s["block_rates"]
    band = (torch.clamp(r - 0.5, min=0) ** 2 + torch.clamp(0.5 - r, min=0) ** 2).mean()
    torch.testing.assert_close(loss, band + (s["flops_ratio"] - 0.5) ** 2)
    assert sparsity_loss(model, progress=0.0).item() == pytest.approx(loss.item())  # model.target_rate = 0.5
    end = sparsity_loss(model, progress=0.5, target=0.5)
    torch.testing.assert_close(end, (s["flops_ratio"] - 0.5) ** 2)


@pytest.mark.parametrize("net", ["resnet", "regnet"])
@pytest.mark.parametrize("mode", ["layer", "channel"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("decisions", ["learned", "forced"])
def test_chain_of_pooled_maps_matches_masked(net, mode, layout, decisions):
    # The sparse network hands each block's output means to the next block's masker and the head;
    # the masked network pools every block input itself. Both decide the same units.
    needs_sparse_ops(mode)
    torch.manual_seed(3)
    if net == "resnet":
        model = LaudResNet((2, 3, 2, 2), mode=mode, num_classes=10)
    else:
        from laudnet_ops.models.regnet import LaudRegNetY
        model = LaudRegNetY((2, 3, 2, 2), (16, 32, 48, 64), 8, mode=mode, granularity=4, num_classes=10)
    randomize_bn(model).eval()
    for masker in (m for m in model.modules() if hasattr(m, "logits_from_means")):
        for linear in (m for m in masker.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(linear.weight, std=3.0)  # per-sample decisions, about half of them kept
            nn.init.zeros_(linear.bias)
    x = _input(seed=4).contiguous(memory_format=getattr(torch, layout if layout != "contiguous" else
                                                        "contiguous_format"))
    with torch.no_grad():
        results, kept = [], []
        for execution in ("masked", "sparse"):
            if decisions == "forced":
                set_force_keep(model, 0.5, seed=5)
            set_execution(model, execution)
            results.append(model(x))
            kept.append([float(b["keep"]) for b in stats(model)["blocks"].values()])
    assert kept[0] == kept[1] and 0 < sum(kept[1]) < len(kept[1])
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_compile_of_a_model_in_eval_runs(channels_last):
    # Eval runs the sparse path where its ops are built (on channels_last maps conv1 on the halo),
    # the masked path otherwise.
    model = LaudResNet((1, 1, 1, 1), mode="spatial", granularity=2, num_classes=10).eval()
    if missing_sparse_ops("spatial"):
        set_execution(model, "masked")
    x = _input(size=32)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.no_grad():
        set_force_keep(model, 0.5, seed=0)
        expected = model(x)
        set_force_keep(model, 0.5, seed=0)
        got = torch.compile(model, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_kept_patch_picture(tmp_path):
    pytest.importorskip("matplotlib")
    skimage_data = pytest.importorskip("skimage.data")
    from laudnet_ops.pictures import overlay_kept_patches

    model = _tiny_resnet("spatial", granularity=(4, 2, 2, 1))
    set_force_keep(model, 0.5, seed=0)
    set_execution(model, "masked")
    path = tmp_path / "kept.png"
    maps = overlay_kept_patches(model, skimage_data.astronaut(), str(path), size=64)
    assert len(maps) == 5 and maps[0][1].shape == (16, 16)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no spatial block"):
        overlay_kept_patches(_tiny_resnet("layer"), skimage_data.astronaut(), str(path), size=32)
