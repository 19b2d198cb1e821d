"""ResNet variants built by the one `ResNet` class: Wide ResNet and ResNeXt (torchvision layouts), SE-ResNet /
SE-ResNeXt (Hu et al. 2018), CIFAR ResNeXt-29 (Xie et al. 2017) and stochastic depth (Huang et al. 2016)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deploycraft.models import create_model
from deploycraft.models.layers import PadShortcut, StochasticDepth, linear_survival_probs
from deploycraft.models.profile import count_params
from deploycraft.models.resnet import SE_MIN_HIDDEN, BasicBlock, Bottleneck
from deploycraft.quant.graph import fold_bn
from deploycraft.recipe import load_recipe
from tests.conftest import FIXTURES, REPO, randomize_bn

TORCHVISION = json.loads((FIXTURES / "torchvision_state_dicts.json").read_text())["models"]


@pytest.fixture
def single_thread():
    """Tiny inputs in a loop: one intra-op thread. On a shared 2-core machine, two threads made a 4x4 ResNet-20
    forward 50x slower (0.31 s vs 6.5 ms) while waiting for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


# --- published sizes and torchvision compatibility -------------------------------------------------


@pytest.mark.parametrize(
    "name, num_classes, millions",
    [
        ("wide_resnet50_2", 1000, 68.9),  # torchvision
        ("resnext50_32x4d", 1000, 25.0),  # Xie et al. 2017, Table 1
        ("se_resnet50", 1000, 28.1),  # Hu et al. 2018
        ("se_resnext50_32x4d", 1000, 27.6),  # Hu et al. 2018
        ("resnext29_8x64d", 10, 34.4),  # Xie et al. 2017, Table 7 (CIFAR-10)
        ("resnext29_16x64d", 10, 68.1),  # Xie et al. 2017, Table 7 (CIFAR-10)
        ("resnet110_sd", 10, 1.7),  # He et al. 2016, Table 6: ResNet-110 (option A shortcuts)
    ],
)
def test_published_param_counts(name, num_classes, millions):
    assert abs(count_params(create_model(name, num_classes=num_classes)) / 1e6 - millions) < 0.1


# The 101-layer ones take 5-10 s each here (88-127 M parameters); tests/models/test_resnet.py checks every
# fixture model that is registered in the default run, so these three repeat it only with `-m slow`.
@pytest.mark.parametrize(
    "name",
    [
        "wide_resnet50_2",
        "resnext50_32x4d",
        pytest.param("wide_resnet101_2", marks=pytest.mark.slow),
        pytest.param("resnext101_32x8d", marks=pytest.mark.slow),
        pytest.param("resnext101_64x4d", marks=pytest.mark.slow),
    ],
)
def test_torchvision_checkpoint_loads_strict(name):
    """torchvision's exact names, order and shapes load with strict=True; the parameter count is torchvision's."""
    ref = TORCHVISION[name]
    model = create_model(name, num_classes=1000)
    assert list(model.state_dict()) == [k for k, _ in ref["state_dict"]]
    fake = {k: torch.full(shape, 0.5) if shape else torch.tensor(3) for k, shape in ref["state_dict"]}
    model.load_state_dict(fake, strict=True)
    assert count_params(model) == ref["params"]
    assert torch.all(model.layer3[0].conv2.weight == 0.5)


def test_resnext_and_wide_widths():
    """The grouped 3x3 of stage s has groups=C and C*d*2^s channels; WRN-50-2 doubles ResNet-50's inner width."""
    for name, groups, first_width in [("resnext50_32x4d", 32, 128), ("resnext101_64x4d", 64, 256)]:
        model = create_model(name, num_classes=10)
        for s in range(4):
            conv = getattr(model, f"layer{s + 1}")[0].conv2
            assert conv.groups == groups and conv.out_channels == first_width * 2**s
    wrn, r50 = create_model("wide_resnet50_2", num_classes=10), create_model("resnet50", num_classes=10)
    assert wrn.layer1[0].conv2.out_channels == 2 * r50.layer1[0].conv2.out_channels == 128
    assert wrn.num_features == r50.num_features == 2048


# --- SE-ResNet / SE-ResNeXt -----------------------------------------------------------------------


@pytest.mark.parametrize("se_name, plain_name", [("se_resnet50", "resnet50"), ("se_resnet20", "resnet20")])
def test_se_adds_exactly_the_gates(se_name, plain_name):
    """SE adds C*h + h + h*C + C parameters per block (two FCs with bias), h = max(C // 16, SE_MIN_HIDDEN)."""
    se, plain = create_model(se_name, num_classes=10), create_model(plain_name, num_classes=10)
    expected = 0
    for blk in _blocks(se):
        c = blk.bn3.num_features if isinstance(blk, Bottleneck) else blk.bn2.num_features
        h = max(c // 16, SE_MIN_HIDDEN)
        assert blk.se.fc1.out_channels == h
        expected += 2 * c * h + h + c
    assert count_params(se) - count_params(plain) == expected
    # Paper width at ImageNet sizes: C/16 exactly (the floor never binds from 256 channels up).
    if se_name == "se_resnet50":
        assert se.layer1[0].se.fc1.out_channels == 16 and se.layer4[0].se.fc1.out_channels == 128


@pytest.mark.parametrize("name", ["se_resnet20", "se_resnext50_32x4d"])
def test_se_gates_the_branch_before_the_add(name):
    """relu(branch * sigmoid(fc2(relu(fc1(gap(branch))))) + shortcut(x)), computed by hand."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    randomize_bn(model)
    blk = model.layer2[0]  # a block with a projection shortcut
    x = torch.relu(torch.randn(2, blk.conv1.in_channels, 8, 8))
    with torch.no_grad():
        out = blk.bn1(blk.conv1(x)).relu()
        if isinstance(blk, Bottleneck):
            out = blk.bn2(blk.conv2(out)).relu()
            branch = blk.bn3(blk.conv3(out))
        else:
            branch = blk.bn2(blk.conv2(out))
        gate = torch.sigmoid(blk.se.fc2(torch.relu(blk.se.fc1(branch.mean((2, 3), keepdim=True)))))
        skip = blk.downsample(x)
        expected = torch.relu(branch * gate + skip)
        got = blk(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, torch.relu(branch + skip), atol=1e-3)  # the gate is really applied


# --- CIFAR ResNeXt-29 -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, cardinality, width", [("resnext29_8x64d", 8, 64), ("resnext29_4x16d", 4, 16)])
def test_resnext29_template(name, cardinality, width):
    """Xie et al. 2017, section 5.3: 3x3 stem of 64, 3 stages x 3 bottlenecks, outputs 256/512/1024, 29 layers."""
    model = create_model(name, num_classes=10)
    assert model.conv1.out_channels == 64 and model.conv1.kernel_size == (3, 3) and model.maxpool is None
    assert [len(getattr(model, s)) for s in model.stage_names] == [3, 3, 3]
    for s, name_ in enumerate(model.stage_names):
        for blk in getattr(model, name_):
            assert blk.conv2.groups == cardinality
            assert blk.conv2.out_channels == cardinality * width * 2**s
            assert blk.conv3.out_channels == 256 * 2**s
    main_path_convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "downsample" not in n]
    assert len(main_path_convs) + 1 == 29  # + the classifier
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1024, 8, 8)


# --- stochastic depth (Huang et al. 2016) -----------------------------------------------------------


def test_resnet110_sd_configuration():
    """54 blocks with p_l = 1 - l/54 * 0.5 (linear decay rule, p_L = 0.5) and option-A shortcuts."""
    model = create_model("resnet110_sd", num_classes=10)
    blocks = _blocks(model)
    assert len(blocks) == 54
    probs = [b.drop_path.survival_prob for b in blocks]
    assert probs == pytest.approx(linear_survival_probs(54, 0.5))
    assert probs[-1] == pytest.approx(0.5) and probs[0] == pytest.approx(1 - 0.5 / 54)
    assert all(b.downsample is None or isinstance(b.downsample, PadShortcut) for b in blocks)


def test_drop_frequency_matches_survival_probabilities(single_thread):
    """Over 400 training forwards, block l's branch is dropped in a fraction 1 - p_l of them (within 4 SE).

    Measured on a 9-block CIFAR ResNet with p_L = 0.5 (the same `final_survival_prob` path as resnet110_sd,
    whose 54 blocks would make 400 forwards too slow for the default suite); p_l spans 0.94..0.5.
    """
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, final_survival_prob=0.5).train()
    sd = [b.drop_path for b in _blocks(model)]
    x = torch.randn(2, 3, 4, 4)
    n = 400
    dropped = [0] * len(sd)
    with torch.no_grad():
        for _ in range(n):
            model(x)
            for i, m in enumerate(sd):
                dropped[i] += not m.last_kept
    for m, d in zip(sd, dropped, strict=True):
        p = m.survival_prob
        se = math.sqrt(p * (1 - p) / n)
        assert abs(d / n - (1 - p)) <= 4 * se, f"p={p:.3f}: dropped {d}/{n}"
    # The schedule matters: the last block (p = 0.5) is dropped far more often than the first (p = 0.94).
    assert dropped[-1] > 3 * dropped[0]


def test_eval_uses_every_block_scaled_by_its_survival_probability(single_thread):
    """In eval each block returns relu(p_l * branch + skip): no block is skipped, none is left unscaled."""
    torch.manual_seed(0)
    model = create_model("resnet110_sd", num_classes=10).eval()
    randomize_bn(model)
    blocks = _blocks(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, (i[0], o))) for k, b in enumerate(blocks)]
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
        for h in hooks:
            h.remove()
        assert sorted(seen) == list(range(len(blocks)))  # every block ran
        for k, blk in enumerate(blocks):
            x, out = seen[k]
            branch = blk.bn2(blk.conv2(blk.bn1(blk.conv1(x)).relu()))
            skip = blk.downsample(x) if blk.downsample is not None else x
            p = blk.drop_path.survival_prob
            assert torch.allclose(out, torch.relu(p * branch + skip), atol=1e-5), f"block {k}"
            assert not torch.allclose(out, torch.relu(branch + skip), atol=1e-5), f"block {k} is not scaled"
            assert not torch.allclose(out, torch.relu(skip), atol=1e-5), f"block {k} is skipped"
    assert all(b.drop_path.last_kept is None for b in blocks)  # eval draws no coin


def test_eval_is_deterministic_and_training_is_not(single_thread):
    torch.manual_seed(0)
    model = create_model("resnet110_sd", num_classes=10)
    randomize_bn(model)  # zero-init last BNs make every branch zero, so dropping one would change nothing
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = {}
    with torch.no_grad():
        for mode in ("eval", "train"):
            getattr(model, mode)()
            results = []
            for seed in (0, 1):
                torch.manual_seed(seed)
                results.append(model(x))
            outs[mode] = results
    assert torch.equal(outs["eval"][0], outs["eval"][1])
    # Same input and batch statistics: only the dropped blocks differ between the two seeds.
    assert not torch.equal(outs["train"][0], outs["train"][1])


def test_stochastic_depth_folds_away_for_deployment(single_thread):
    """fold_bn moves each p_l into the branch's last BN, so no StochasticDepth op reaches the ONNX graph."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, final_survival_prob=0.5).eval()
    randomize_bn(model)
    folded = fold_bn(model)
    assert not any(isinstance(m, StochasticDepth) for m in folded.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)


# --- recipes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, arch, kwargs",
    [
        ("resnext29_fmnist", "resnext29_4x16d", {}),
        ("se_resnet20_fmnist", "se_resnet20", {}),
        ("resnet56_sd_fmnist", "resnet56", {"final_survival_prob": 0.8}),
    ],
)
def test_recipes_build_their_model(recipe, arch, kwargs):
    r = load_recipe(REPO / "recipes" / f"{recipe}.yaml")
    assert r.model.arch == arch and r.model.kwargs == kwargs
    assert (r.data.dataset, r.data.image_size, r.data.channels) == ("fashion-mnist", 28, 1)
    model = create_model(arch, num_classes=r.model.num_classes, in_chans=r.data.channels, **r.model.kwargs)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    if kwargs:
        assert _blocks(model)[-1].drop_path.survival_prob == pytest.approx(0.8)
