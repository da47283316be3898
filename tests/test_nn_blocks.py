"""Dynamic blocks: masked vs sparse execution, force_keep limits, gradients, FLOPs statistics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laudnet_ops.nn import (
    DynamicBottleneck,
    DynamicRegNetYBlock,
    fold_bn,
    set_execution,
    set_force_keep,
    stats,
)
from laudnet_ops.nn.blocks import missing_sparse_ops


def needs_sparse_ops(mode):
    missing = missing_sparse_ops(mode)
    if missing:
        pytest.skip(f"sparse {mode} path needs ops not built here: {missing}")


def randomize_bn(module, seed=0):
    """Non-trivial batch-norm statistics and affines, so that folding is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            c = bn.num_features
            bn.running_mean.copy_(torch.rand(c, generator=gen) * 0.2 - 0.1)
            bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.data.copy_(torch.rand(c, generator=gen) * 0.2 - 0.1)
    return module


def bottleneck(mode, stride=1, granularity=1, inplanes=16, planes=4, force_keep=None):
    torch.manual_seed(0)
    downsample = None
    if stride != 1 or inplanes != planes * 4:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
    return randomize_bn(DynamicBottleneck(inplanes, planes, stride, downsample, mode=mode, granularity=granularity,
                                          force_keep=force_keep))


def regnet_block(mode, stride=1, granularity=1, width_in=16, width_out=16, force_keep=None):
    torch.manual_seed(0)
    return randomize_bn(DynamicRegNetYBlock(width_in, width_out, stride, group_width=8, mode=mode,
                                            granularity=granularity, force_keep=force_keep))


BUILDERS = {"bottleneck": bottleneck, "regnet": regnet_block}

# (mode, granularity): spatial S = 3 and 4 do not divide the 9x7 / 5x4 maps; channel G = 2 and 4.
MODE_CASES = [("dense", 1), ("spatial", 1), ("spatial", 3), ("spatial", 4), ("channel", 2), ("channel", 4),
              ("layer", 1)]


def _blocks(kind, mode, granularity, stride, **kw):
    if kind == "bottleneck":
        # stride 1 without projection (identity shortcut), stride 2 with one.
        return bottleneck(mode, stride, granularity, inplanes=16, planes=4, **kw)
    return regnet_block(mode, stride, granularity, width_in=16, width_out=16 if stride == 1 else 24, **kw)


@pytest.mark.parametrize("kind", ["bottleneck", "regnet"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode,granularity", MODE_CASES)
@pytest.mark.parametrize("keep", [0.5, None])
def test_masked_and_sparse_agree_in_eval(kind, stride, mode, granularity, keep):
    needs_sparse_ops(mode)
    block = _blocks(kind, mode, granularity, stride, force_keep=keep).eval()
    x = F.relu(torch.randn(3, 16, 9, 7))
    set_force_keep(block, keep, seed=1)
    set_execution(block, "masked")
    expected = block(x)
    masks = block._laud_record.mask
    set_force_keep(block, keep, seed=1)
    set_execution(block, "sparse")
    got = block(x.clone())
    if masks is not None:
        assert torch.equal(block._laud_record.mask.float(), masks.float())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bottleneck", "regnet"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode,granularity", [("dense", 1), ("spatial", 3), ("channel", 2), ("layer", 1)])
def test_masked_and_sparse_agree_on_channels_last_maps(kind, stride, mode, granularity):
    needs_sparse_ops(mode)
    block = _blocks(kind, mode, granularity, stride, force_keep=0.5).eval()
    x = F.relu(torch.randn(3, 16, 9, 7)).contiguous(memory_format=torch.channels_last)
    set_force_keep(block, 0.5, seed=1)
    set_execution(block, "masked")
    expected = block(x)
    set_force_keep(block, 0.5, seed=1)
    set_execution(block, "sparse")
    got = block(x.clone(memory_format=torch.channels_last))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["bottleneck", "regnet"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode,granularity", [("dense", 1), ("spatial", 3), ("spatial", 4), ("channel", 8),
                                              ("layer", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_masked_and_sparse_agree_on_cuda(kind, stride, mode, granularity, dtype):
    # Widths of multiples of 8 and channels_last, so float16 takes the tensor-core kernels where they
    # apply (groups == 1) and float32 the SIMT ones; the masked path is cuDNN's dense convolutions.
    needs_sparse_ops(mode)
    if kind == "bottleneck":
        block = bottleneck(mode, stride, granularity, inplanes=32, planes=8, force_keep=0.5)
    else:
        block = regnet_block(mode, stride, granularity, width_in=32, width_out=32 if stride == 1 else 48,
                             force_keep=0.5)
    block = block.eval().to("cuda", dtype).to(memory_format=torch.channels_last)
    x = F.relu(torch.randn(4, 32, 9, 7)).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    set_force_keep(block, 0.5, seed=1)
    set_execution(block, "masked")
    expected = block(x).float()
    set_force_keep(block, 0.5, seed=1)
    set_execution(block, "sparse")
    got = block(x.clone(memory_format=torch.channels_last)).float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    else:  # three half-precision convolutions, rounded at different points on the two paths
        assert (got - expected).abs().max() <= 2e-2 * expected.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("kind", ["bottleneck", "regnet"])
@pytest.mark.parametrize("mode,granularity", MODE_CASES)
def test_sparse_in_place_residual_when_the_block_owns_its_input(kind, mode, granularity):
    needs_sparse_ops(mode)
    block = _blocks(kind, mode, granularity, 1, force_keep=0.5).eval()
    x = F.relu(torch.randn(2, 16, 8, 8))
    set_execution(block, "masked")
    set_force_keep(block, 0.5, seed=2)
    expected = block(x)
    block.owns_activated_input = True
    set_execution(block, "sparse")
    set_force_keep(block, 0.5, seed=2)
    torch.testing.assert_close(block(x.clone()), expected, atol=1e-5, rtol=1e-4)


@pytest.fixture
def op_calls(monkeypatch):
    """The names of the compiled ops the blocks fetch (all through ``blocks.op``), in order."""
    import laudnet_ops.nn.blocks as blocks

    calls = []
    real_op = blocks.op
    monkeypatch.setattr(blocks, "op", lambda name: calls.append(name) or real_op(name))
    return calls


@pytest.mark.parametrize("kind", ["bottleneck", "regnet"])
@pytest.mark.parametrize("owns_input", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sparse_spatial_fuses_the_last_conv_with_the_scatter(op_calls, kind, owns_input, channels_last):
    # The sparse spatial path ends in conv1x1_scatter_add (in place when the block owns its input or
    # adds into its own projection output), and no (P, Cout, S, S) conv3 output is made: the op list
    # is exactly the fused pipeline.
    needs_sparse_ops("spatial")
    block = _blocks(kind, "spatial", 3, 1, force_keep=0.2).eval()
    block.owns_activated_input = owns_input
    x = F.relu(torch.randn(2, 16, 24, 21))
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    set_execution(block, "sparse")
    set_force_keep(block, 0.2, seed=2)
    block(x.clone(memory_format=torch.preserve_format))
    in_place = owns_input or block._projection() is not None
    last = "conv1x1_scatter_add_" if in_place else "conv1x1_scatter_add"
    # conv1 of a channels_last map runs on the pixels the kept patches' halos read, else fused with the masker.
    first = "masked_conv1x1" if channels_last else "masker_conv1x1"
    assert op_calls == [first, "patch_indices", "gather_conv2d", last]


@pytest.mark.parametrize("kind", ["bottleneck", "regnet"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("granularity", [1, 2, 3])
@pytest.mark.parametrize("keep", [0.1, 0.4, 1.0])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("on_halo", [None, False, True])
def test_sparse_spatial_conv1_on_the_halo_or_every_pixel(op_calls, kind, stride, granularity, keep, channels_last,
                                                         on_halo):
    # conv1 on just the input pixels the kept patches' 3x3 halo reads (masked_conv1x1; by default for
    # channels_last maps), or on every pixel fused with the masker: either way the gather convolution
    # after it finds every value it reads, so sparse = masked.
    needs_sparse_ops("spatial")
    block = _blocks(kind, "spatial", granularity, stride).eval()
    block.conv1_on_halo = on_halo
    x = F.relu(torch.randn(2, 16, 17, 14))
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    set_force_keep(block, keep, seed=3)
    set_execution(block, "masked")
    expected = block(x)
    set_force_keep(block, keep, seed=3)
    set_execution(block, "sparse")
    got = block(x.clone(memory_format=torch.preserve_format))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    halo = channels_last if on_halo is None else on_halo
    assert op_calls[0] == ("masked_conv1x1" if halo else "masker_conv1x1")


@pytest.mark.parametrize("kind", ["bottleneck", "regnet"])
@pytest.mark.parametrize("mode,granularity", MODE_CASES[1:])
@pytest.mark.parametrize("execution", ["masked", "sparse"])
def test_force_keep_zero_leaves_the_shortcut(kind, mode, granularity, execution):
    if execution == "sparse":
        needs_sparse_ops(mode)
    for stride in (1, 2):
        block = _blocks(kind, mode, granularity, stride, force_keep=0.0).eval()
        set_execution(block, execution)
        x = torch.randn(2, 16, 9, 7)
        shortcut = getattr(block, "downsample", None) or getattr(block, "proj", None)
        expected = F.relu(x if shortcut is None else shortcut(x))
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bottleneck", "regnet"])
@pytest.mark.parametrize("mode,granularity", MODE_CASES[1:])
def test_force_keep_one_is_the_dense_block(kind, mode, granularity):
    for stride in (1, 2):
        dense = _blocks(kind, "dense", 1, stride).eval()
        dynamic = _blocks(kind, mode, granularity, stride, force_keep=1.0).eval()
        dynamic.load_state_dict(dense.state_dict(), strict=False)
        set_execution(dynamic, "masked")
        set_execution(dense, "masked")
        x = torch.randn(2, 16, 9, 7)
        torch.testing.assert_close(dynamic(x), dense(x), rtol=0, atol=0)


def test_dense_block_matches_torchvision_bottleneck():
    tv = pytest.importorskip("torchvision")
    block = bottleneck("dense", stride=2).eval()
    ref = tv.models.resnet.Bottleneck(16, 4, 2, block.downsample)
    ref.load_state_dict(block.state_dict())
    ref.eval()
    x = torch.randn(2, 16, 9, 7)
    set_execution(block, "masked")
    torch.testing.assert_close(block(x), ref(x), rtol=0, atol=0)


def test_dense_block_matches_torchvision_regnet_block():
    tv = pytest.importorskip("torchvision")
    from torchvision.models.regnet import ResBottleneckBlock

    block = regnet_block("dense", stride=2, width_out=24).eval()
    ref = ResBottleneckBlock(16, 24, 2, nn.BatchNorm2d, nn.ReLU, group_width=8, bottleneck_multiplier=1.0,
                             se_ratio=0.25)
    ref.load_state_dict(block.state_dict())
    ref.eval()
    x = torch.randn(2, 16, 9, 7)
    set_execution(block, "masked")
    torch.testing.assert_close(block(x), ref(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["bottleneck", "regnet"])
@pytest.mark.parametrize("mode,granularity", [("spatial", 2), ("channel", 2), ("layer", 1)])
def test_gradients_reach_the_masker_in_training(kind, mode, granularity):
    block = _blocks(kind, mode, granularity, 2).train()
    block(torch.randn(4, 16, 8, 8)).square().mean().backward()
    grads = [p.grad for p in block.masker.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert block.conv1.weight.grad is not None if kind == "bottleneck" else block.f.a[0].weight.grad is not None


def test_sparse_execution_refuses_training():
    block = bottleneck("dense").train()
    set_execution(block, "sparse")
    with pytest.raises(RuntimeError, match="sparse execution path is for inference"):
        block(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="execution must be one of"):
        set_execution(block, "fast")


def test_sparse_execution_without_its_ops_is_refused_and_eval_falls_back(monkeypatch):
    import laudnet_ops.nn.blocks as blocks

    monkeypatch.setattr(blocks, "has_op", lambda name: name != "channel_gated_conv2d")
    block = bottleneck("channel", granularity=2, force_keep=0.5).eval()
    with pytest.raises(NotImplementedError, match=r"sparse channel path needs the ops \['channel_gated_conv2d'\]"):
        set_execution(block, "sparse")
    assert block.resolved_execution() == "masked"
    assert bottleneck("dense").eval().resolved_execution() == "sparse"


def test_bad_mode_and_granularity():
    with pytest.raises(ValueError, match="mode must be one of"):
        bottleneck("patch")
    with pytest.raises(ValueError, match="granularity G=3 must divide the block width 4"):
        bottleneck("channel", granularity=3)


def test_fold_bn():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(5)))[0].eval()
    w, b = fold_bn(conv.weight, conv.bias, bn)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)), atol=1e-5, rtol=1e-5)


def _macs(conv, hw):
    return conv.out_channels * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1] * hw


def test_stats_of_a_stride_one_spatial_bottleneck():
    block = bottleneck("spatial", granularity=2).eval()
    set_execution(block, "masked")
    block.masker.set_force_keep(0.0)
    x = torch.randn(1, 16, 4, 4)
    block(x)
    # Keep only the top-left 2x2 patch: 4 of 16 output pixels; its 3x3 halo reads 3x3 input pixels.
    block._laud_record.mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    s = stats(block)
    (only,) = s["blocks"].values()
    conv1, conv2, conv3 = (_macs(c, 16) for c in (block.conv1, block.conv2, block.conv3))
    masker = 16 * 16 + 16 * 4
    executed = conv1 * 9 / 16 + (conv2 + conv3) * 4 / 16 + masker
    assert only["keep"] == pytest.approx(0.25)
    assert only["dense_flops"] == pytest.approx(conv1 + conv2 + conv3)
    assert only["flops"] == pytest.approx(executed)
    assert only["activation_rate"] == pytest.approx(executed / (conv1 + conv2 + conv3))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("S, H, W", [(1, 7, 6), (2, 9, 9), (3, 10, 7), (4, 5, 11)])
def test_halo_mask_is_the_receptive_field_of_the_kept_patches(stride, S, H, W):
    from laudnet_ops.nn import halo_mask

    Ho, Wo = -(-H // stride), -(-W // stride)
    gen = torch.Generator().manual_seed(S * 10 + stride)
    mask = torch.rand(3, -(-Ho // S), -(-Wo // S), generator=gen) < 0.4
    want = torch.zeros(3, H, W, dtype=torch.bool)
    for n, py, px in mask.nonzero().tolist():
        for oy in range(py * S, min((py + 1) * S, Ho)):
            for ox in range(px * S, min((px + 1) * S, Wo)):
                # 3x3, padding 1: output (oy, ox) reads input rows stride*oy-1 .. stride*oy+1.
                want[n, max(0, stride * oy - 1):stride * oy + 2, max(0, stride * ox - 1):stride * ox + 2] = True
    got = halo_mask(mask, S, stride, (H, W), (Ho, Wo))
    assert got.dtype == torch.bool and torch.equal(got[:, 0], want)
    assert torch.equal(halo_mask(mask.float(), S, stride, (H, W), (Ho, Wo))[:, 0], want.float())


def test_stats_of_stride_two_halo_and_channel_and_layer():
    from laudnet_ops.nn.stats import dilated_density

    # Output pixel (0, 0) of a stride-2 3x3 conv reads input rows/cols -1..1 -> 2x2 of a 6x6 input.
    mask = torch.zeros(1, 3, 3)
    mask[0, 0, 0] = 1
    assert dilated_density(mask, 1, 2, (6, 6), (3, 3)).item() == pytest.approx(4 / 36)
    mask[0, 2, 2] = 1  # output (2, 2) reads rows/cols 3..5 -> 3x3 more
    assert dilated_density(mask, 1, 2, (6, 6), (3, 3)).item() == pytest.approx(13 / 36)

    block = bottleneck("channel", granularity=2, force_keep=0.5).eval()
    set_execution(block, "masked")
    block(torch.randn(2, 16, 4, 4))
    block._laud_record.mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    c = torch.tensor([0.5, 1.0])
    conv1, conv2, conv3 = (_macs(cv, 16) for cv in (block.conv1, block.conv2, block.conv3))
    masker = block._laud_record.parts["masker"]
    expected = (conv1 * c + conv2 * c * c + conv3 * c).sum() + 2 * masker
    assert stats(block)["flops"] == pytest.approx(expected.item())

    block = bottleneck("layer", stride=2, force_keep=0.0).eval()
    set_execution(block, "masked")
    block(torch.randn(2, 16, 4, 4))
    s = stats(block)
    parts = block._laud_record.parts
    assert s["flops"] == pytest.approx(2 * (parts["downsample"] + parts["masker"]))


def test_stats_flops_ratio_is_differentiable_in_training():
    block = bottleneck("spatial", granularity=2).train()
    block(torch.randn(2, 16, 8, 8))
    s = stats(block)
    s["flops_ratio"].backward()
    assert block.masker.conv.bias.grad is not None
