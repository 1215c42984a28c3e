"""fastdrop.nn: drop-in modules, replace_dropout on a third-party model, DropRateScheduler."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
import fastdrop  # noqa: E402
import fastdrop.nn as fnn  # noqa: E402
from fastdrop.schedules import LinearWarmup, StepSchedule  # noqa: E402
from torch import nn  # noqa: E402

# (fastdrop module, torch.nn module or None, functional call, a fitting input shape)
MODULES = [
    (fnn.Dropout, nn.Dropout, lambda x: fastdrop.dropout(x, 0.3), (4, 10)),
    (fnn.Dropout1d, nn.Dropout1d, lambda x: fastdrop.dropout1d(x, 0.3), (4, 6, 10)),
    (fnn.Dropout2d, nn.Dropout2d, lambda x: fastdrop.dropout2d(x, 0.3), (4, 6, 5, 5)),
    (fnn.Dropout3d, nn.Dropout3d, lambda x: fastdrop.dropout3d(x, 0.3), (2, 6, 3, 3, 3)),
    (fnn.AlphaDropout, nn.AlphaDropout, lambda x: fastdrop.alpha_dropout(x, 0.3, True), (4, 10)),
    (
        fnn.FeatureAlphaDropout,
        nn.FeatureAlphaDropout,
        lambda x: fastdrop.feature_alpha_dropout(x, 0.3, True),
        (4, 6, 5),
    ),
    (fnn.DropPath, None, lambda x: fastdrop.drop_path(x, 0.3, True), (8, 10)),
    (fnn.DropBlock2d, None, lambda x: fastdrop.drop_block_2d(x, 0.3, 7), (2, 3, 9, 9)),
]
IDS = [m[0].__name__ for m in MODULES]


@pytest.mark.parametrize("cls,torch_cls,call,shape", MODULES, ids=IDS)
def test_module_in_sequential_train_and_eval(cls, torch_cls, call, shape):
    model = nn.Sequential(nn.Identity(), cls(0.3))
    x = torch.randn(shape)
    torch.manual_seed(5)
    y = model(x)
    torch.manual_seed(5)
    assert torch.equal(y, call(x))  # the module is the function, keyed by torch's seed
    assert not torch.equal(y, x)
    model.eval()
    assert model(x) is x
    model.train()
    assert not torch.equal(model(x), x)


@pytest.mark.parametrize("cls,torch_cls,call,shape", MODULES, ids=IDS)
def test_module_has_no_state(cls, torch_cls, call, shape):
    m = cls(0.3)
    assert m.state_dict() == {} and list(m.parameters()) == [] and list(m.buffers()) == []


@pytest.mark.parametrize(
    "cls,torch_cls,call,shape",
    [m for m in MODULES if m[1] is not None],
    ids=[i for i, m in zip(IDS, MODULES) if m[1] is not None],
)
def test_torch_modules_keep_torchs_constructor_and_repr(cls, torch_cls, call, shape):
    assert repr(cls(0.25, inplace=True)) == repr(torch_cls(0.25, inplace=True)).replace(
        torch_cls.__name__, cls.__name__
    )
    assert isinstance(cls(), torch_cls)  # code that checks isinstance(m, nn.Dropout) still works
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            cls(bad)


@pytest.mark.parametrize("cls", [fnn.DropPath, fnn.DropBlock2d])
def test_timm_modules_reject_rates_outside_unit_interval(cls):
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            cls(bad)


def test_inplace_module_writes_input():
    x = torch.randn(100)
    ptr = x.data_ptr()
    y = fnn.Dropout(0.5, inplace=True)(x)
    assert y is x and x.data_ptr() == ptr and bool((x == 0).any())


def test_module_generator_argument():
    x = torch.randn(1000)
    a = fnn.Dropout(0.5, generator=fastdrop.Generator(3))(x)
    assert torch.equal(a, fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(3)))


def test_timm_module_reprs_and_drop_block_kwargs():
    timm_drop = pytest.importorskip("timm.layers.drop")
    assert repr(fnn.DropPath(0.12345)) == repr(timm_drop.DropPath(0.12345))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fnn.DropBlock2d(0.1, 5, batchwise=True, fast=False)  # timm's retired arguments: silent
    with pytest.warns(UserWarning, match="unexpected keyword argument 'bogus'"):
        fnn.DropBlock2d(0.1, 5, bogus=1)


def test_dropout2d_with_strict_shapes_rejects_deprecated_shapes_torch_only_warns_on():
    with pytest.raises(RuntimeError, match="received a 5D input"):
        fnn.Dropout2d(0.5, strict_shapes=True)(torch.randn(2, 3, 4, 5, 6))


def test_training_a_small_model_reduces_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, :1] * 2 - x[:, 1:2]).float()
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), fnn.Dropout(0.2), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = None
    for _ in range(200):
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


# --- replace_dropout --------------------------------------------------------------------------


def _vit():
    models = pytest.importorskip("timm.models.vision_transformer")
    return models.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=3,
        num_heads=3,
        num_classes=5,
        drop_rate=0.1,
        attn_drop_rate=0.1,
        proj_drop_rate=0.1,
        drop_path_rate=0.2,
    )


def test_replace_dropout_on_timm_vision_transformer():
    timm_drop = pytest.importorskip("timm.layers.drop")
    torch.manual_seed(0)
    model = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    timm_paths = [n for n, m in model.named_modules() if isinstance(m, timm_drop.DropPath)]
    timm_rates = [model.get_submodule(n).drop_prob for n in timm_paths]
    torch_drops = [n for n, m in model.named_modules() if type(m) is nn.Dropout]
    assert timm_paths and torch_drops

    replaced = fnn.replace_dropout(model)

    # Attention's own dropout is converted too (see test_attention.py).
    attention = {n for n, m in model.named_modules() if type(m).__name__ == "Attention"}
    assert attention and set(replaced) == set(timm_paths) | set(torch_drops) | attention
    assert replaced[timm_paths[0]].endswith("DropPath")
    for name in timm_paths:
        m = model.get_submodule(name)
        assert type(m) is fnn.DropPath and not m.training
    assert not any(
        type(m) is nn.Dropout or isinstance(m, timm_drop.DropPath) for m in model.modules()
    )
    assert [model.get_submodule(n).drop_prob for n in timm_paths] == timm_rates
    with torch.no_grad():
        assert torch.equal(model(x), before)
    after_sd = model.state_dict()
    assert list(after_sd) == list(before_sd)
    assert all(torch.equal(after_sd[k], before_sd[k]) for k in before_sd)
    assert fnn.replace_dropout(model) == {}  # nothing left to replace

    model.train()
    out = model(x)
    out.sum().backward()
    assert model.head.weight.grad is not None


def test_replace_dropout_keeps_arguments_and_mode():
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.Dropout(0.3, inplace=True),
        nn.Sequential(nn.Dropout2d(0.4), nn.AlphaDropout(0.1)),
    )
    model[2].eval()
    replaced = fnn.replace_dropout(model)
    assert replaced == {
        "1": "torch.nn.modules.dropout.Dropout",
        "2.0": "torch.nn.modules.dropout.Dropout2d",
        "2.1": "torch.nn.modules.dropout.AlphaDropout",
    }
    assert type(model[1]) is fnn.Dropout and model[1].p == 0.3 and model[1].inplace
    assert model[1].training and not model[2][0].training and model[2][0].p == 0.4


# --- DropRateScheduler ------------------------------------------------------------------------


def test_scheduler_sets_rates_and_survives_state_dict():
    model = nn.Sequential(fnn.Dropout(0.5), nn.Linear(3, 3), fnn.DropPath(0.5))
    sched = fnn.DropRateScheduler(model, LinearWarmup(0.4, warmup_steps=4))
    assert model[0].p == 0.0 and model[2].drop_prob == 0.0
    for _ in range(2):
        sched.step()
    assert model[0].p == pytest.approx(0.2) and model[2].drop_prob == pytest.approx(0.2)
    state = sched.state_dict()

    other = nn.Sequential(fnn.Dropout(0.5), nn.Linear(3, 3), fnn.DropPath(0.5))
    resumed = fnn.DropRateScheduler(other, LinearWarmup(0.4, warmup_steps=4))
    resumed.load_state_dict(state)
    assert other[0].p == pytest.approx(0.2)
    for _ in range(5):
        resumed.step()
        sched.step()
    assert other[0].p == model[0].p == pytest.approx(0.4)
    assert resumed.last_step == sched.last_step == 7


def test_scheduler_selects_modules():
    model = nn.Sequential(fnn.Dropout(0.5), fnn.DropPath(0.5), fnn.DropBlock2d(0.5))
    fnn.DropRateScheduler(model, StepSchedule([0.1, 0.3], [10]), select=fnn.DropPath)
    assert model[0].p == 0.5 and model[1].drop_prob == 0.1 and model[2].drop_prob == 0.5
    fnn.DropRateScheduler(model, lambda step: 0.25, select=lambda name, m: name == "2")
    assert model[2].drop_prob == 0.25 and model[1].drop_prob == 0.1


def test_scheduler_rejects_torch_modules_and_bad_rates():
    with pytest.raises(TypeError, match="replace_dropout"):
        fnn.DropRateScheduler(
            nn.Sequential(nn.Dropout()),
            lambda s: 0.1,
            select=lambda n, m: isinstance(m, nn.Dropout),
        )
    with pytest.raises(ValueError):
        fnn.DropRateScheduler(nn.Sequential(fnn.Dropout()), lambda s: 1.5)


def test_fastdrop_nn_loads_on_attribute_access():
    import subprocess
    import sys

    code = (
        "import sys, fastdrop\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "m = torch.nn.Sequential(torch.nn.Dropout(0.1))\n"
        "assert fastdrop.nn.replace_dropout(m) == {'0': 'torch.nn.modules.dropout.Dropout'}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# A bad argument fails at construction with the error the first training forward would raise
# (the functional's own check): (module, the functional it calls, arguments, a fitting shape).
_X4, _X5 = (2, 3, 6, 6), (1, 2, 4, 4, 4)
_BLOCK = dict(drop_prob=0.1, block_size=3)
BAD_ARGUMENTS = [
    (fnn.DropPath, fastdrop.drop_path, dict(drop_prob=0.1, scale_by_keep="yes"), _X4),
    (fnn.DropBlock2d, fastdrop.drop_block_2d, dict(drop_prob=0.1, block_size="3"), _X4),
    (fnn.DropBlock2d, fastdrop.drop_block_2d, dict(drop_prob=0.1, block_size=0), _X4),
    (fnn.DropBlock2d, fastdrop.drop_block_2d, dict(_BLOCK, gamma_scale=-1.0), _X4),
    (fnn.DropBlock2d, fastdrop.drop_block_2d, dict(_BLOCK, gamma_scale="1"), _X4),
    (fnn.DropBlock2d, fastdrop.drop_block_2d, dict(_BLOCK, with_noise=2), _X4),
    (fnn.DropBlock2d, fastdrop.drop_block_2d, dict(_BLOCK, couple_channels=None), _X4),
    (fnn.DropBlock2d, fastdrop.drop_block_2d, dict(_BLOCK, scale_by_keep="no"), _X4),
    (fnn.DropBlock2d, fastdrop.drop_block_2d, dict(_BLOCK, inplace=1), _X4),
    (fnn.LockedDropout, fastdrop.locked_dropout, dict(p=0.5, batch_first="yes"), (4, 2, 3)),
    (fnn.GaussianDropout, fastdrop.gaussian_dropout, dict(p=0.5, inplace="yes"), (4, 3)),
    (fnn.PatchDropout, fastdrop.patch_dropout, dict(prob=0.5, num_prefix_tokens=-1), (2, 5, 3)),
    (fnn.PatchDropout, fastdrop.patch_dropout, dict(prob=0.5, ordered="yes"), (2, 5, 3)),
    (fnn.PatchDropout, fastdrop.patch_dropout, dict(prob=0.5, return_indices=1), (2, 5, 3)),
    (fnn.StochasticDepth, fastdrop.stochastic_depth, dict(p=1.5, mode="row"), (4, 3)),
    (fnn.StochasticDepth, fastdrop.stochastic_depth, dict(p=0.1, mode="col"), (4, 3)),
    (fnn.DropBlock3d, fastdrop.drop_block_3d, dict(p=0.1, block_size=0), _X5),
    (fnn.DropBlock3d, fastdrop.drop_block_3d, dict(p=0.1, block_size=3, eps=-1.0), _X5),
    # torchvision's 2-D block: the same check as drop_block_3d's
    (
        fnn.TorchvisionDropBlock2d,
        fastdrop.drop_block_3d,
        dict(p=0.1, block_size=3, inplace="y"),
        _X5,
    ),
]


@pytest.mark.parametrize("cls,fn,kwargs,shape", BAD_ARGUMENTS)
def test_modules_refuse_bad_arguments_at_construction_as_their_forward_does(cls, fn, kwargs, shape):
    with pytest.raises((TypeError, ValueError)) as forward_error:
        fn(torch.randn(shape), training=True, **kwargs)
    with pytest.raises(type(forward_error.value)) as construction_error:
        cls(**kwargs)
    assert str(construction_error.value) == str(forward_error.value)


def _module_classes_with_a_generator():
    import inspect

    return sorted(
        name
        for name, cls in vars(fnn).items()
        if isinstance(cls, type)
        and issubclass(cls, nn.Module)
        and not name.startswith("_")
        and "generator" in inspect.signature(cls).parameters
    )


def test_every_family_module_takes_a_generator():
    assert len(_module_classes_with_a_generator()) == 16


@pytest.mark.parametrize("name", _module_classes_with_a_generator())
def test_modules_refuse_a_bad_generator_at_construction(name):
    cls = getattr(fnn, name)
    args = {
        "EmbeddingDropout": lambda: (nn.Embedding(4, 2), 0.5),
        "WeightDropout": lambda: (nn.Linear(2, 2), 0.5),
        "StochasticDepth": lambda: (0.5, "row"),
        "DropBlock3d": lambda: (0.1, 3),
        "TorchvisionDropBlock2d": lambda: (0.1, 3),
    }.get(name, tuple)
    with pytest.raises(TypeError, match="generator must be a fastdrop.Generator or a torch"):
        cls(*args(), generator=7)
    assert isinstance(cls(*args(), generator=fastdrop.Generator(1)).generator, fastdrop.Generator)
    assert cls(*args(), generator=torch.Generator().manual_seed(1)).generator is not None


def test_a_bad_generator_gets_one_error_on_every_torch_path():
    """Module construction, a CPU tensor and another device (meta) refuse it alike."""
    words = "generator must be a fastdrop.Generator or a torch.Generator for torch input, got int"
    calls = [
        lambda: fnn.Dropout(0.5, generator=7),
        lambda: fastdrop.dropout(torch.randn(4), 0.5, generator=7),
        lambda: fastdrop.dropout(torch.randn(4, device="meta"), 0.5, generator=7),
    ]
    for call in calls:
        with pytest.raises(TypeError) as e:
            call()
        assert str(e.value) == words
