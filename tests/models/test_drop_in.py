"""The everyday uses of a torchvision ResNet, with the fused path on, against torchvision on the
same weights: float64 torchvision as the oracle, torchvision's own float32 error as the yardstick
(resnet_fast.nn's modules step aside to the formulas where the fused kernels cannot serve a use:
hooks, other norm layers, parametrized convolutions, captures)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import resnet_fast


def twins(arch="resnet18", **kwargs):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(**kwargs)
    for m in tv.modules():  # non-trivial statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    ours = resnet_fast.get_model(arch, **kwargs)
    ours.load_state_dict(tv.state_dict())
    return ours, tv


def assert_float32_close(got, tv_run, exact_run, what):
    """``got`` (ours in float32) against ``exact_run`` (torchvision in float64), at most twice as far
    off as ``tv_run`` (torchvision in float32: one run, or a tuple of runs in NCHW and channels_last,
    whose oneDNN kernels round differently; the fused path runs channels_last), plus a floor of
    float32 rounding."""
    runs = tv_run if isinstance(tv_run, tuple) else (tv_run,)
    got, exact = got.detach().double(), exact_run.detach().double()
    err = (got - exact).abs().max().item()
    tv_err = max((t.detach().double() - exact).abs().max().item() for t in runs)
    assert err <= 2 * tv_err + 1e-6 * exact.abs().max().item(), (what, err, tv_err)


def run_all(fn, ours, tv):
    """fn(model) for ours in float32, torchvision in float32 (NCHW and channels_last weights, as a
    tuple) and torchvision in float64."""
    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    double = copy.deepcopy(tv).double()
    got, a, b, exact = fn(ours), fn(tv), fn(tv_cl), fn(double)
    return got, _pair_up(a, b), exact


def _pair_up(a, b):
    if isinstance(a, dict):
        return {k: _pair_up(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return tuple(_pair_up(x, y) for x, y in zip(a, b))
    return (a, b)


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def x_like(model):
    return X.to(next(model.parameters()).dtype)


def test_forward_hooks_see_torchvisions_feature_maps():
    ours, tv = twins()
    for model in (ours, tv):
        model.eval()

    def features(model):
        seen = {}
        handles = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
                   for n in ("layer1", "layer2", "layer3", "layer4")]
        # (torchvision adds the residual and applies ReLU in place on this output: the hook's tensor
        # is the block's output by the end, in both)
        handles.append(model.layer3[1].bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o)))
        with torch.no_grad():
            model(x_like(model))
        for h in handles:
            h.remove()
        return seen

    got, want, exact = run_all(features, ours, tv)
    assert set(got) == set(want)
    for k in want:
        assert_float32_close(got[k], want[k], exact[k], k)


def grad_cam(model, target=3):
    """Grad-CAM on layer4: a forward hook keeps the activations, a full backward hook their
    gradient."""
    kept = {}
    h1 = model.layer4.register_forward_hook(lambda m, i, o: kept.__setitem__("act", o))
    h2 = model.layer4.register_full_backward_hook(lambda m, gi, go: kept.__setitem__("grad", go[0]))
    model.eval()
    x = x_like(model).clone().requires_grad_(True)
    model(x)[:, target].sum().backward()
    h1.remove(), h2.remove()
    weights = kept["grad"].mean((2, 3), keepdim=True)
    return F.relu((weights * kept["act"]).sum(1)), x.grad


def test_grad_cam():
    ours, tv = twins()
    (cam, gx), (cam_tv, gx_tv), (cam_ex, gx_ex) = run_all(grad_cam, ours, tv)
    assert_float32_close(cam, cam_tv, cam_ex, "Grad-CAM map")
    assert_float32_close(gx, gx_tv, gx_ex, "input gradient")


def test_backward_hooks_on_inner_modules_fire_as_in_torchvision():
    ours, tv = twins()
    seen = {}
    for name, model in (("ours", ours), ("tv", tv)):
        grads = seen.setdefault(name, {})
        for conv in ("conv1", "conv2"):
            getattr(model.layer2[0], conv).register_full_backward_hook(
                lambda m, gi, go, conv=conv, grads=grads: grads.__setitem__(conv, go[0])
            )
        model(X).sum().backward()
    assert set(seen["ours"]) == set(seen["tv"]) == {"conv1", "conv2"}
    for k in seen["tv"]:
        torch.testing.assert_close(seen["ours"][k], seen["tv"][k], rtol=1e-3, atol=1e-4 * float(seen["tv"][k].abs().max()))
    # A BatchNorm's output is added to and ReLU'd in place in torchvision: a full backward hook there
    # is refused by autograd, in both.
    errors = []
    for model in (ours, tv):
        model.layer2[0].bn2.register_full_backward_pre_hook(lambda m, go: None)
        with pytest.raises(RuntimeError) as caught:
            model(X).sum().backward()
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "BackwardHookFunction" in errors[0]


def train_step(model, freeze=()):
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(freeze))
    model.train()
    out = model(x_like(model))
    loss = out.square().mean()
    loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, model.state_dict()


@pytest.mark.parametrize("freeze", [("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"), ("conv1", "bn1", "layer1")],
                         ids=["fine-tune the classifier", "first stages frozen"])
def test_frozen_parameters(freeze):
    ours, tv = twins()
    (out, grads, state), (out_tv, grads_tv, state_tv), (out_ex, grads_ex, state_ex) = run_all(
        lambda m: train_step(m, freeze), ours, tv
    )
    assert set(grads) == set(grads_tv) and not any(k.startswith(freeze) for k in grads)
    assert_float32_close(out, out_tv, out_ex, "output")
    # (No gradient here: through a train-mode BatchNorm of batch 2 the float32 gradients of every
    # implementation are chaotic; tests/models/test_resnet.py checks them in float64.)
    assert_float32_close(grads["fc.weight"], grads_tv["fc.weight"], grads_ex["fc.weight"], "fc grad")
    for k in state_tv:
        if state_ex[k].is_floating_point():
            assert_float32_close(state[k], state_tv[k], state_ex[k], k)


def test_frozen_batchnorm_in_eval_mode_inside_a_training_net():
    """Detection and segmentation fine-tuning keep the backbone's BatchNorms in eval mode while
    the rest trains."""
    ours, tv = twins()

    def step(model):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        out = model(x_like(model))
        out.square().mean().backward()
        return out, model.layer1[0].conv1.weight.grad

    (o, g), (o_tv, g_tv), (o_ex, g_ex) = run_all(step, ours, tv)
    assert_float32_close(o, o_tv, o_ex, "output")
    assert_float32_close(g, g_tv, g_ex, "layer1 conv grad")


def test_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint, checkpoint_sequential

    ours, tv = twins()

    def step(model):
        model.eval()  # (in train mode a recomputed BatchNorm updates its statistics twice, in any implementation)
        x = x_like(model).clone().requires_grad_(True)
        y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        y = checkpoint(model.layer1, y, use_reentrant=False)
        y = checkpoint_sequential(model.layer2, 2, y, use_reentrant=False)
        y = model.layer4(model.layer3(y))
        out = model.fc(torch.flatten(model.avgpool(y), 1))
        out.square().sum().backward()
        return out, x.grad, model.layer1[0].conv2.weight.grad

    for got, tv_run, exact, what in zip(*run_all(step, ours, tv), ("output", "input grad", "checkpointed conv grad")):
        assert_float32_close(got, tv_run, exact, what)


def test_cpu_autocast():
    ours, tv = twins()

    def forward(model):
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(X)

    got, tv_run = forward(ours), forward(tv)
    with torch.no_grad():
        exact = copy.deepcopy(tv).double()(X.double())
    assert got.dtype == tv_run.dtype
    assert_float32_close(got, tv_run, exact, "bfloat16 autocast output")


def test_sync_batchnorm_conversion():
    ours, tv = twins()
    ours, tv = nn.SyncBatchNorm.convert_sync_batchnorm(ours), nn.SyncBatchNorm.convert_sync_batchnorm(tv)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in ours.modules()) == 20

    def forward(model, training):
        model.train(training)
        return model(x_like(model))  # (no process group: SyncBatchNorm computes as BatchNorm2d)

    for training in (False, True):
        got, tv_run, exact = run_all(lambda m: forward(m, training), ours, tv)
        assert_float32_close(got, tv_run, exact, f"SyncBatchNorm, training={training}")


def test_functional_call():
    ours, tv = twins()
    params = {k: v * 1.01 if v.is_floating_point() else v for k, v in tv.state_dict().items()}

    def call(model):
        model.eval()
        p = {k: v.to(next(model.parameters()).dtype) if v.is_floating_point() else v for k, v in params.items()}
        with torch.no_grad():
            return torch.func.functional_call(model, p, (x_like(model),))

    assert_float32_close(*run_all(call, ours, tv), "functional_call")
    with torch.no_grad():  # the model's own parameters are untouched
        torch.testing.assert_close(ours.eval()(X), tv.eval()(X), rtol=1e-4, atol=1e-4)


def test_deepcopy_and_pickle_keep_working_and_stay_independent():
    ours, _ = twins()
    ours.eval()
    with torch.no_grad():
        expected = ours(X)
        clone = copy.deepcopy(ours)
        clone.fc.weight.mul_(2)
        torch.testing.assert_close(ours(X), expected)
        torch.testing.assert_close(pickle.loads(pickle.dumps(ours))(X), expected)


def test_dilated_backbone_for_segmentation():
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead

    ours, tv = twins("resnet50", replace_stride_with_dilation=[False, True, True])

    def segment(model):
        torch.manual_seed(2)
        head = DeepLabHead(2048, 5).to(next(model.parameters()).dtype).eval()
        backbone = IntermediateLayerGetter(model, {"layer4": "out"}).eval()
        with torch.no_grad():
            return head(backbone(x_like(model))["out"])

    assert_float32_close(*run_all(segment, ours, tv), "DeepLabV3 logits")


def test_detection_backbone_from_intermediate_layers():
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    ours, tv = twins("resnet50", norm_layer=torchvision.ops.FrozenBatchNorm2d)

    def fpn(model, training):
        torch.manual_seed(3)
        backbone = _resnet_fpn_extractor(copy.deepcopy(model), trainable_layers=3).to(next(model.parameters()).dtype)
        backbone.train(training)
        feats = backbone(x_like(model))
        if training:
            sum(f.square().mean() for f in feats.values()).backward()
            return feats["0"], backbone.body.layer4[0].conv1.weight.grad
        return feats["0"], feats["pool"]

    for training in (False, True):
        for got, tv_run, exact in zip(*run_all(lambda m: fpn(m, training), ours, tv)):
            assert_float32_close(got, tv_run, exact, f"FPN, training={training}")


def test_weight_norm_parametrized_convolution():
    ours, tv = twins()
    for model in (ours, tv):
        torch.nn.utils.parametrizations.weight_norm(model.layer1[0].conv1)

    def forward(model):
        model.eval()
        with torch.no_grad():
            return model(x_like(model))

    assert_float32_close(*run_all(forward, ours, tv), "weight-normed conv")


def test_half_precision_inference_on_the_cpu():
    ours, tv = twins()

    def forward(model, dtype):
        model = copy.deepcopy(model).to(dtype).eval()
        with torch.no_grad():
            return model(X.to(dtype))

    got, tv_run, exact = forward(ours, torch.float16), forward(tv, torch.float16), forward(tv, torch.float64)
    assert got.dtype == torch.float16
    assert_float32_close(got, tv_run, exact, "float16 output")


def test_replacing_the_classifier_for_fine_tuning():
    ours, tv = twins()
    torch.manual_seed(4)
    ours.fc = nn.Linear(512, 7)
    tv.fc = copy.deepcopy(ours.fc)
    out, out_tv, out_ex = run_all(lambda m: train_step(m, freeze=("conv1",))[0], ours, tv)
    assert out.shape == (2, 7)
    assert_float32_close(out, out_tv, out_ex, "output")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_gradient_penalty_step(arch, training):
    """A gradient penalty (R1, WGAN-GP, input-gradient regularisation): the parameters' gradient
    of loss + |d loss / d x|^2, a second derivative through every fused op. float64 against
    torchvision to rounding; float32 within twice torchvision's own float32 error (norms over the
    input gradient and over all parameter gradients). The input is one where no float32 run flips
    a ReLU in eval mode: a flip in one implementation and not another moves the second
    derivatives by whole terms (seen: 100x), which no tolerance separates from a bug; the
    per-op tests (gradgradcheck) and float64 here check the math."""
    ours, tv = twins(arch)
    x0 = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))

    def step(model):
        model.train(training)
        x = x0.to(next(model.parameters()).dtype).clone().requires_grad_(True)
        loss = model(x).square().mean()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + gx.square().sum()).backward()
        return gx.detach().double().flatten(), torch.cat([p.grad.double().flatten() for p in model.parameters()])

    exact = step(copy.deepcopy(tv).double())
    for got64, want in zip(step(copy.deepcopy(ours).double()), exact):
        torch.testing.assert_close(got64, want, rtol=1e-6, atol=1e-8 * float(want.abs().max()))
    got, tv32, tv_cl = step(ours), step(tv), step(copy.deepcopy(tv).to(memory_format=torch.channels_last))
    for i, what in enumerate(("input gradient", "parameter gradients")):
        err = (got[i] - exact[i]).norm().item()
        tv_err = max((tv32[i] - exact[i]).norm().item(), (tv_cl[i] - exact[i]).norm().item())
        if not training:
            assert tv_err <= 1e-5 * exact[i].norm().item(), "this input flips a ReLU in torchvision's float32 run"
        assert err <= 2 * tv_err + 1e-7 * exact[i].norm().item(), (what, err, tv_err)
