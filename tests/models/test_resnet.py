"""The ImageNet ResNets against torchvision: same weights, same outputs, gradients and statistics."""

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._api import WeightsEnum

import resnet_fast
from resnet_fast.nn import ZeroPadShortcut

DEPTHS = {
    "resnet18": (resnet_fast.ResNet18, torchvision.models.resnet18),
    "resnet34": (resnet_fast.ResNet34, torchvision.models.resnet34),
    "resnet50": (resnet_fast.ResNet50, torchvision.models.resnet50),
    "resnet101": (resnet_fast.ResNet101, torchvision.models.resnet101),
    "resnet152": (resnet_fast.ResNet152, torchvision.models.resnet152),
}
def twin(name, **kwargs):
    ours_fn, tv_fn = DEPTHS[name]
    tv = tv_fn(**kwargs)
    ours = ours_fn(**kwargs)
    ours.load_state_dict(tv.state_dict())
    return ours, tv


def run_step(model, x):
    """Output, input gradient, parameter gradients and state (running statistics) of one training step."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    results = {"output": out.detach(), "input grad": x.grad}
    results.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    results.update({f"state {k}": v for k, v in model.state_dict().items()})
    return results


def _groups(results):
    """Concatenates results by kind: output, input grad, parameter grads, running statistics."""
    out = {}
    for k, v in results.items():
        if v.is_floating_point():
            out.setdefault(k.split(" ")[0], []).append(v.detach().double().flatten())
    return {k: torch.cat(v) for k, v in out.items()}


def check_against_torchvision(ours, tv, x, backend):
    """The eager backend runs torchvision's ops in torchvision's order: bit-exact. Fused kernels
    round differently. In float64 they agree with torchvision to rounding; in float32 their error
    against torchvision-in-float64 may be at most twice torchvision's own float32 error, taken over
    each kind of result as a whole (the forward in training, everything in eval) (a single ReLU whose input rounds to the other side of zero
    moves one gradient entry by a whole term, in either implementation)."""
    if backend == "eager":
        got = run_step(ours, x)
        for k, v in run_step(tv, x).items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
        return
    ours64, tv64 = copy.deepcopy(ours).double(), copy.deepcopy(tv).double()
    got64, exact = run_step(ours64, x.double()), run_step(tv64, x.double())
    for k, v in exact.items():
        atol = 1e-8 * float(v.abs().max()) if v.is_floating_point() else 0
        torch.testing.assert_close(got64[k], v, rtol=1e-7, atol=atol, msg=lambda m: f"float64 {k}: {m}")
    # The fused path convolves in channels_last, whose oneDNN kernels round differently from
    # NCHW's: torchvision's error is taken in both layouts.
    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    tv_cl_run = _groups(run_step(tv_cl, x.contiguous(memory_format=torch.channels_last)))
    got, tv32, exact = _groups(run_step(ours, x)), _groups(run_step(tv, x)), _groups(exact)
    for k, v in exact.items():
        if ours.training and k in ("input", "grad"):
            # Backward through batch statistics of 2x2 maps at batch 2 is chaotic in float32:
            # torchvision's own input gradient is off by percents. float64 above checks it, and
            # tests/ops checks the float32 gradients of each op.
            continue
        err = (got[k] - v).norm().item()
        tv_err = max((tv32[k] - v).norm().item(), (tv_cl_run[k] - v).norm().item())
        assert err <= 2 * tv_err + 1e-6 * v.norm().item(), (k, err, tv_err)


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("name", list(DEPTHS))
def test_matches_torchvision_train_and_eval(name, backend):
    resnet_fast.set_backend(backend)
    ours, tv = twin(name)
    x = torch.randn(2, 3, 64, 64)
    check_against_torchvision(ours.train(), tv.train(), x, backend)
    ours.load_state_dict(tv.state_dict())  # the same running statistics, to rounding, made the same
    check_against_torchvision(ours.eval(), tv.eval(), x, backend)


def test_state_dict_is_torchvisions():
    for name in DEPTHS:
        ours, tv = DEPTHS[name][0](), DEPTHS[name][1]()
        a, b = ours.state_dict(), tv.state_dict()
        assert list(a) == list(b), name
        assert all(a[k].shape == b[k].shape for k in a), name
        tv.load_state_dict(a, strict=True)


def test_momentum_none_and_untracked_stats_follow_batchnorm():
    for momentum, track in [(None, True), (0.3, False)]:
        ours, tv = twin("resnet18", norm_layer=lambda c: nn.BatchNorm2d(c, momentum=momentum, track_running_stats=track))
        ours, tv = ours.double(), tv.double()
        for _ in range(3):
            x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
            torch.testing.assert_close(ours(x), tv(x), rtol=1e-7, atol=1e-9)
        for k, v in tv.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(ours.eval()(x), tv.eval()(x), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(zero_init_residual=True),
        dict(replace_stride_with_dilation=[False, True, True]),
        dict(groups=32, width_per_group=4),  # ResNeXt-50 32x4d
        dict(width_per_group=128),  # Wide ResNet-50-2
        dict(num_classes=10),
        dict(norm_layer=torchvision.ops.FrozenBatchNorm2d),
    ],
)
def test_torchvision_options(kwargs):
    tv = torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], **kwargs)
    ours = resnet_fast.ResNet(resnet_fast.nn.Bottleneck, [3, 4, 6, 3], **kwargs)
    assert list(ours.state_dict()) == list(tv.state_dict())
    if kwargs.get("zero_init_residual"):
        assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in ours.modules() if isinstance(b, resnet_fast.nn.Bottleneck))
    ours.load_state_dict(tv.state_dict())
    # float64: train-mode batch statistics of tiny maps amplify float32 rounding.
    ours, tv, x = ours.double(), tv.double(), torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(ours(x), tv(x), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ours.eval()(x), tv.eval()(x), rtol=1e-7, atol=1e-9)


def test_weights_from_a_file(tmp_path):
    tv = torchvision.models.resnet18().eval()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    ours = resnet_fast.resnet18(weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))
    ours = resnet_fast.resnet18(weights=path).eval()  # a pathlib.Path too
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))


def test_torchvision_weight_enums(monkeypatch):
    # No network here: serve the enum's download from a local state_dict, through torchvision's API.
    tv = torchvision.models.resnet50()
    fetched = []

    def fake_get_state_dict(self, *args, **kwargs):
        fetched.append((self, kwargs))
        return tv.state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    W = torchvision.models.ResNet50_Weights
    for weights in (W.IMAGENET1K_V2, "IMAGENET1K_V1", "DEFAULT"):
        ours = resnet_fast.ResNet50(weights=weights, progress=False)
        assert ours.fc.out_features == 1000
        torch.testing.assert_close(ours.conv1.weight, tv.conv1.weight)
    assert [w for w, _ in fetched] == [W.IMAGENET1K_V2, W.IMAGENET1K_V1, W.IMAGENET1K_V2]
    assert fetched[0][1]["progress"] is False
    with pytest.raises(ValueError, match="num_classes"):
        resnet_fast.ResNet50(weights=W.IMAGENET1K_V2, num_classes=10)
    with pytest.raises(TypeError, match="expected ResNet50_Weights"):
        resnet_fast.ResNet50(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    with pytest.raises(ValueError, match="neither a file nor one of"):
        resnet_fast.ResNet50(weights="IMAGENET9K")


def test_state_dict_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="do not fit resnet34.*missing keys: layer1.2"):
        resnet_fast.resnet34(weights=path)
    with pytest.raises(ValueError, match="shape mismatches"):
        resnet_fast.resnet50(weights=path)
    with pytest.raises(ValueError, match="num_classes"):
        resnet_fast.resnet18(weights=path, num_classes=10)
    with pytest.raises(FileNotFoundError):
        resnet_fast.resnet18(weights=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read weights"):
        resnet_fast.resnet18(weights=tmp_path / "junk.pth")


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(3, 64, 64), "expects a 4-D input"),
        (torch.randn(1, 1, 64, 64), "expects 3 input channels"),
        (torch.randn(1, 3, 0, 64), "at least 1x1"),
        (torch.randn(1, 3, 32, 32), "too small for training"),
    ],
)
def test_bad_input_names_what_was_expected(x, message):
    model = resnet_fast.resnet18()
    with pytest.raises(ValueError, match=message):
        model(x)


def test_small_images_work_where_batchnorm_can():
    model = resnet_fast.resnet18()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)  # batch 2: two values per channel
    assert model(torch.randn(1, 3, 33, 33)).shape == (1, 1000)  # a 2x2 last map
    assert model.eval()(torch.randn(1, 3, 1, 1)).shape == (1, 1000)  # eval: running statistics


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="unknown architecture 'resnet51'"):
        resnet_fast.get_model("resnet51")
    with pytest.raises(ValueError, match="unknown shortcut option 'D'"):
        resnet_fast.resnet50(shortcut="D")
    with pytest.raises(ValueError, match="stride_in_1x1 applies to Bottleneck"):
        resnet_fast.resnet18(stride_in_1x1=True)
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        resnet_fast.resnet50(replace_stride_with_dilation=[True])


# Table 1: multiply-adds of the paper's nets (stride on the bottleneck's first 1x1). The paper
# gives two significant digits; our counts agree within 2%.
TABLE_1_FLOPS = {"resnet18": 1.8e9, "resnet34": 3.6e9, "resnet50": 3.8e9, "resnet101": 7.6e9, "resnet152": 11.3e9}


@pytest.mark.parametrize("name", list(TABLE_1_FLOPS))
def test_multiply_adds_match_table_1(name):
    kwargs = {"stride_in_1x1": True} if name not in ("resnet18", "resnet34") else {}
    flops = resnet_fast.count_multiply_adds(resnet_fast.get_model(name, **kwargs))
    assert abs(flops / TABLE_1_FLOPS[name] - 1) < 0.02, flops


def test_torchvision_stride_placement_costs_more():
    # ResNet v1.5 (stride on the 3x3) is torchvision's 4.1 GFLOPs, not the paper's 3.8.
    flops = resnet_fast.count_multiply_adds(resnet_fast.resnet50())
    assert abs(flops / 4.1e9 - 1) < 0.01


def test_shortcut_options():
    a, b, c = (resnet_fast.resnet50(shortcut=s) for s in "ABC")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(a) < n(b) < n(c)
    assert sum(isinstance(m, ZeroPadShortcut) for m in a.modules()) == 4  # one per stage's first block
    assert all(blk.downsample is not None for layer in (c.layer1, c.layer4) for blk in layer)
    assert n(b) == n(torchvision.models.resnet50())
    x = torch.randn(2, 3, 64, 64)
    for m in (a, b, c):
        out = m(x)
        out.sum().backward()
        assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_plain_nets_have_no_shortcuts():
    p = resnet_fast.plain34()
    assert all(blk.downsample is None and not blk.residual for layer in (p.layer1, p.layer2) for blk in layer)
    assert sum(x.numel() for x in p.parameters()) < sum(x.numel() for x in resnet_fast.resnet34().parameters())
    assert p(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_pickles_and_deep_copies():
    for model in (resnet_fast.resnet18(shortcut="A").eval(), resnet_fast.resnet50().eval()):
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), expected)
            torch.testing.assert_close(copy.deepcopy(model)(x), expected)


def test_forward_hooks_on_batchnorm_still_fire():
    model = resnet_fast.resnet18()
    seen = []
    model.layer1[0].bn2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(torch.randn(2, 3, 64, 64))
    assert seen == [torch.Size([2, 64, 16, 16])]


def test_torchvision_feature_extraction_traces_the_model():
    # torchvision.models.feature_extraction traces with torch.fx: the model then records
    # torchvision's graph of module calls, and the features equal torchvision's.
    from torchvision.models.feature_extraction import create_feature_extractor

    tv = torchvision.models.resnet50().eval()
    ours = resnet_fast.resnet50().eval()
    ours.load_state_dict(tv.state_dict())
    nodes = {"layer2": "c3", "layer4": "c5", "fc": "logits"}
    x = torch.randn(2, 3, 64, 64)
    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)  # our weights' layout
    with torch.no_grad():
        extractor = create_feature_extractor(ours, nodes)
        assert not any("resnet_fast" in str(n.target) for n in extractor.graph.nodes)  # PyTorch's ops only
        got = extractor(x)
        want = create_feature_extractor(tv, nodes)(x)
        want_cl = create_feature_extractor(tv_cl, nodes)(x)
        for k in want:
            torch.testing.assert_close(got[k], want_cl[k], rtol=1e-6, atol=1e-6 * float(want[k].abs().max()))
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4 * float(want[k].abs().max()))
        cifar = resnet_fast.resnet20().eval()  # the option-A shortcut traces too
        xc = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(create_feature_extractor(cifar, {"fc": "o"})(xc)["o"], cifar(xc), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not resnet_fast.extension_available(), reason="needs the compiled extension's CPU kernels")
@pytest.mark.parametrize("training", [True, False])
def test_an_nchw_batch_runs_channels_last_inside(training):
    # The net runs channels_last whatever the caller's layout: in training the NCHW batch goes to
    # the stem convolution as it is (no converted copy kept alive), whose output is channels_last.
    model = resnet_fast.resnet18().train(training)
    seen = []
    model.layer1.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 64, 64)
    assert x.is_contiguous()
    with torch.set_grad_enabled(training):
        model(x)
    assert seen == [True]
