"""The CIFAR-10 nets of section 4.2 against Table 6 and against an independent implementation."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from resnet_fast.nn import ZeroPadShortcut

# Table 6: parameters of the CIFAR-10 ResNets, to the paper's precision.
TABLE_6 = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6, "resnet110": 1.7e6, "resnet1202": 19.4e6}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, expected", list(TABLE_6.items()))
def test_parameter_counts_match_table_6(name, expected):
    digits = 1 if expected >= 1e6 else 2
    model = resnet_fast.get_model(name)
    assert round(n_params(model) / 1e6, digits) == round(expected / 1e6, digits)
    plain = name.replace("resnet", "plain")
    if plain in resnet_fast.list_models():  # option A adds no parameters
        assert n_params(resnet_fast.get_model(plain)) == n_params(model)


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_depth_counts_weighted_layers(depth):
    model = resnet_fast.CifarResNet(depth)
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == depth  # 6n + 2, option A adds no convolution
    assert sum(isinstance(m, ZeroPadShortcut) for m in model.modules()) == 2


def test_feature_maps_and_filters():
    model = resnet_fast.resnet20()
    shapes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert shapes == {"layer1": (2, 16, 32, 32), "layer2": (2, 32, 16, 16), "layer3": (2, 64, 8, 8)}


class IndependentCifarNet(nn.Module):
    """Section 4.2 written out directly with nn modules and F.pad, sharing no code with resnet_fast."""

    def __init__(self, n, residual=True):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        c_in = 16
        for i, c in enumerate((16, 32, 64)):
            layer = nn.ModuleList()
            for j in range(n):
                s = 2 if i > 0 and j == 0 else 1
                blk = nn.Module()
                blk.conv1 = nn.Conv2d(c_in, c, 3, s, 1, bias=False)
                blk.bn1 = nn.BatchNorm2d(c)
                blk.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
                blk.bn2 = nn.BatchNorm2d(c)
                blk.stride, blk.pad = s, c - c_in
                layer.append(blk)
                c_in = c
            setattr(self, f"layer{i + 1}", layer)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3):
            for b in layer:
                out = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))
                if self.residual:
                    out = out + F.pad(x[:, :, :: b.stride, :: b.stride], (0, 0, 0, 0, 0, b.pad))
                x = F.relu(out)
        return self.fc(x.mean((2, 3)))


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    return {"output": out.detach(), "input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("residual", [True, False])
def test_matches_an_independent_implementation(backend, residual):
    resnet_fast.set_backend(backend)
    ref = IndependentCifarNet(3, residual).double()
    ours = resnet_fast.CifarResNet(20, residual=residual).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)

    # float64: the same math, to rounding.
    got, want = _grads(ours, x), _grads(ref, x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-9, atol=1e-12)

    # float32: against the float64 result, at most twice the error of the eager nn modules, in
    # either layout (the fused path runs channels_last, whose oneDNN kernels round differently;
    # where a pre-activation lies within rounding of zero, its ReLU flips in one run and not in
    # another, moving a gradient by a whole term: seen on an AVX-512 CPU, eager NCHW 1.9e-6 and
    # eager channels_last 4.4e-3 on the same input gradient).
    ours32, ref32 = copy.deepcopy(ours).float().train(), copy.deepcopy(ref).float().train()
    ref_cl = copy.deepcopy(ref).float().train().to(memory_format=torch.channels_last)
    ref.train()
    exact = _grads(ref, x)
    got, eager = _grads(ours32, x.float()), _grads(ref32, x.float())
    eager_cl = _grads(ref_cl, x.float().contiguous(memory_format=torch.channels_last))
    for k in exact:
        err = (got[k].double() - exact[k]).abs().max().item()
        eager_err = max((e[k].double() - exact[k]).abs().max().item() for e in (eager, eager_cl))
        assert err <= 2 * eager_err + 1e-6 * exact[k].abs().max().item(), (k, err, eager_err)


def test_resnet1202_runs():
    model = resnet_fast.resnet1202()
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 10) and torch.isfinite(model.conv1.weight.grad).all()


def test_options_and_errors():
    assert resnet_fast.resnet20(num_classes=100).fc.out_features == 100
    b = resnet_fast.resnet20(shortcut="B")
    assert n_params(b) > n_params(resnet_fast.resnet20())
    with pytest.raises(ValueError, match="6n \\+ 2"):
        resnet_fast.CifarResNet(21)
    with pytest.raises(ValueError, match="unknown shortcut option"):
        resnet_fast.resnet20(shortcut="E")
    model = resnet_fast.resnet20()
    with pytest.raises(ValueError, match="expects 3 input channels"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="too small for training"):
        model(torch.randn(1, 3, 4, 4))


def test_weights_round_trip_and_mismatch(tmp_path):
    model = resnet_fast.resnet32().eval()
    torch.save(model.state_dict(), tmp_path / "r32.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(resnet_fast.resnet32(weights=tmp_path / "r32.pt").eval()(x), model(x))
    with pytest.raises(ValueError, match="do not fit resnet20"):
        resnet_fast.resnet20(weights=tmp_path / "r32.pt")
    # A training checkpoint ({"model": state_dict, ...}) loads too.
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    with torch.no_grad():
        torch.testing.assert_close(resnet_fast.resnet32(weights=tmp_path / "ckpt.pt").eval()(x), model(x))


def test_pickles_with_its_option_a_shortcut():
    model = resnet_fast.resnet20().eval()
    clone = pickle.loads(pickle.dumps(model))
    assert isinstance(clone.layer2[0].downsample, ZeroPadShortcut)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
