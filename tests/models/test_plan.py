"""A network's inference forward replayed from its recording (resnet_fast._plan): bitwise the
modules' forward, and never used once anything it depends on has changed."""

import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import resnet_fast
from resnet_fast import _plan, _routing
from resnet_fast.nn import functional as rf_functional
from tests.conftest import requires_extension

pytestmark = requires_extension


def randomised(model):
    for m in model.modules():  # non-trivial statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def unplanned(model, x):
    """The modules' forward (no plan recorded or used)."""
    previous = _routing.PLAN_FORWARD
    _routing.PLAN_FORWARD = False
    try:
        return model(x)
    finally:
        _routing.PLAN_FORWARD = previous


class CountingConvBnAct:
    """Counts the module-level fused calls: a replay makes none."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = rf_functional.conv_bn_act

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        from resnet_fast.nn import blocks

        # The blocks call it, and the stem (resnet_fast.nn.functional.stem_conv_bn_act) in inference.
        for module in (blocks, rf_functional):
            monkeypatch.setattr(module, "conv_bn_act", counted)


@pytest.mark.parametrize(
    "build, size",
    [
        (lambda: resnet_fast.resnet50(), 64),
        (lambda: resnet_fast.resnet18(shortcut="A"), 64),
        (lambda: resnet_fast.resnet34(shortcut="C"), 48),
        (lambda: resnet_fast.resnet20(), 32),
        (lambda: resnet_fast.plain18(), 40),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_replay_is_bitwise_the_modules_forward(build, size, batch, layout, mode, monkeypatch):
    model = randomised(build())
    x = torch.randn(batch, 3, size, size)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        expected = unplanned(model, x)
        first = model(x)  # recorded
        assert _plan.plans_of(model) == 1
        counter = CountingConvBnAct(monkeypatch)
        second = model(x)  # replayed
        assert counter.calls == 0, "the second forward should have been replayed, not run by the modules"
        third = model(x.clone())
    for y in (first, second, third):
        assert torch.equal(y, expected)
        assert y.is_inference() == (mode == "inference_mode")
    assert second.data_ptr() != first.data_ptr()  # a fresh output each time


def test_every_intermediate_is_released_after_its_last_reader():
    model = randomised(resnet_fast.resnet18())
    with torch.inference_mode():
        model(torch.randn(2, 3, 64, 64))
    (plan,) = _plan._PLANS[model].values()
    freed = [s for step in plan._steps for s in step[-1]]
    assert sorted(freed) == sorted(set(range(plan._slots)) - {plan._output})


def _model_and_input():
    model = randomised(resnet_fast.resnet18())
    return model, torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda m: m.layer1[0].bn1.running_var.mul_(4.0), id="buffer in place"),
        pytest.param(lambda m: m.layer2[1].conv2.weight.mul_(-1.0), id="weight in place"),
        pytest.param(lambda m: m.load_state_dict(randomised(resnet_fast.resnet18()).state_dict()), id="load_state_dict"),
        pytest.param(lambda m: setattr(m, "fc", nn.Linear(512, 1000)), id="module replaced"),
        pytest.param(lambda m: setattr(m.fc, "weight", nn.Parameter(torch.randn(1000, 512))), id="parameter replaced"),
        pytest.param(lambda m: setattr(m.layer3[0].bn2, "eps", 0.5), id="attribute"),
        pytest.param(lambda m: m.layer4[0].bn1.register_buffer("running_mean", torch.ones(512)), id="buffer replaced"),
        pytest.param(lambda m: setattr(m.layer1[1], "downsample", nn.Sequential(
            nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64)).eval()), id="shortcut added"),
    ],
)
def test_a_change_to_the_model_records_anew(change):
    model, x = _model_and_input()
    with torch.inference_mode():
        before = model(x)
        model(x)
        change(model)
        expected = unplanned(model, x)
        got = model(x)
        again = model(x)
    assert not torch.equal(expected, before), "the change should change the output"
    assert torch.equal(got, expected) and torch.equal(again, expected)


def test_hooks_fire_and_the_output_follows_them():
    model, x = _model_and_input()
    seen = []
    with torch.inference_mode():
        model(x)
        model(x)
        handle = model.layer2.register_forward_hook(lambda m, i, o: seen.append(o.shape) or o * 2)
        expected = unplanned(model, x)
        seen.clear()
        got = model(x)
        assert seen == [torch.Size([2, 128, 8, 8])]
        handle.remove()
        plain = model(x)
        assert torch.equal(model(x), plain)
    assert torch.equal(got, expected)
    assert not torch.equal(plain, got)


class Logged(nn.Module):
    """A user's module with a Python side effect: it must run at every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_a_tree_with_a_users_module_is_never_planned():
    model, x = _model_and_input()
    model.fc = Logged(model.fc)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
    assert model.fc.calls == 3
    assert _plan.plans_of(model) == 0


def test_a_patched_forward_runs():
    model, x = _model_and_input()
    with torch.inference_mode():
        model(x)
        model(x)
        model.layer4.forward = lambda t: torch.zeros(t.shape[0], 512, 2, 2)  # an instance attribute
        y = model(x)
        model(x)
    assert torch.allclose(y, model.fc.bias.expand_as(y))
    assert _plan.plans_of(model) == 0


def test_training_gradients_autocast_and_the_eager_backend_run_the_modules():
    model, x = _model_and_input()
    with torch.inference_mode():
        model(x)
    assert _plan.plans_of(model) == 1
    _plan._PLANS.clear()
    y = model(x)  # eval, but gradients enabled
    assert y.requires_grad and _plan.plans_of(model) == 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        model(x)
    assert _plan.plans_of(model) == 0
    with torch.no_grad(), resnet_fast.use_backend("eager"):
        model(x)
        model(x)
    assert _plan.plans_of(model) == 0
    model.train()
    with torch.no_grad():
        before = model.bn1.num_batches_tracked.clone()
        model(x)
        model(x)
    assert model.bn1.num_batches_tracked == before + 2  # the running statistics still update
    assert _plan.plans_of(model) == 0


def test_each_input_key_has_its_own_plan_and_old_ones_go():
    model = randomised(resnet_fast.resnet20())
    with torch.inference_mode():
        for n in range(1, _plan.MAX_PLANS + 3):
            x = torch.randn(n, 3, 32, 32)
            model(x)
            assert torch.equal(model(x), unplanned(model, x))
    assert _plan.plans_of(model) == _plan.MAX_PLANS


def test_a_planned_model_copies_and_pickles_without_its_plans():
    model, x = _model_and_input()
    with torch.inference_mode():
        model(x)
        expected = model(x)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert _plan.plans_of(other) == 0
        with torch.inference_mode():
            assert torch.equal(other(x), expected)


def test_threads_replay_one_plan():
    model, x = _model_and_input()
    inputs = [torch.randn(2, 3, 64, 64) for _ in range(4)]
    with torch.inference_mode():
        model(x)
        expected = [unplanned(model, t) for t in inputs]
    results = [None] * len(inputs)

    def run(i):
        with torch.inference_mode():
            for _ in range(3):
                results[i] = model(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_a_recording_that_reads_tensor_data_or_writes_a_constant_is_not_kept():
    model, x = _model_and_input()
    constant = torch.zeros(3)
    with torch.inference_mode():
        _plan.forward(model, x, lambda t: t * float(t.sum()))  # a Python value from the data
        assert _plan.plans_of(model) == 0
        _plan.forward(model, x, lambda t: t + constant.add_(1).sum())  # writes a tensor it does not own
        assert _plan.plans_of(model) == 0
        y = _plan.forward(model, x, lambda t: t * 2)
        assert _plan.plans_of(model) == 1 and torch.equal(y, x * 2)
        assert torch.equal(_plan.forward(model, x, lambda t: t * 2), x * 2)


def test_a_profiled_forward_shows_each_op_once(monkeypatch):
    from tests.conftest import op_names

    model, x = _model_and_input()

    def forward():
        with torch.inference_mode():
            model(x)

    with torch.inference_mode():
        unplanned(model, x)  # (folds)
    unrecorded = op_names(forward)  # nothing recorded under the profiler
    assert _plan.plans_of(model) == 0
    forward()  # recorded
    assert op_names(forward) == unrecorded  # replayed: the same ops
