"""Plain networks (He et al. 2016): the CIFAR ResNets without shortcuts, built by the same ResNet class.

Forward/backward, eval determinism and ONNX parity of every registered name are in test_zoo.py; pruning of
every family in tests/test_pruning.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from deploycraft.errors import UserError
from deploycraft.models import create_model, list_models, model_info
from deploycraft.models.layers import PadShortcut, ResidualAdd
from deploycraft.models.profile import count_params
from deploycraft.onnx_io import export_onnx
from deploycraft.pruning import removable_blocks
from deploycraft.quant.placement import act_quantizers, insert_quantizers
from deploycraft.runtime.ort import optimized_op_counts
from tests.conftest import randomize_bn

DEPTHS = (20, 32, 44, 56, 110)


def test_registered_as_family_plain():
    assert [n for n in list_models("plain")] == sorted(f"plain{d}" for d in DEPTHS)
    assert all(model_info(f"plain{d}").input_style == "cifar" for d in DEPTHS)


@pytest.mark.parametrize("depth", DEPTHS)
def test_same_layers_as_the_resnet_without_shortcuts(depth):
    """He et al. 2016, section 4.2: the plain net is the option-A ResNet (no shortcut parameters) minus the
    shortcuts, so the state dicts match key for key and shape for shape, and the weighted depth is 6n+2."""
    plain = create_model(f"plain{depth}", num_classes=10)
    resnet = create_model(f"resnet{depth}", num_classes=10, shortcut="A")
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in resnet.state_dict().items()}
    assert count_params(plain) == count_params(resnet)
    assert not any(isinstance(m, (ResidualAdd, PadShortcut)) for m in plain.modules())
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in plain.modules()) == depth


def test_plain20_parameter_count():
    # He et al. 2016, Table 6: the 20-layer CIFAR net has 0.27 M parameters (shortcuts add none with option A).
    assert count_params(create_model("plain20", num_classes=10)) == pytest.approx(0.27e6, rel=0.01)


def test_block_is_conv_bn_relu_twice():
    """The output of a plain block is relu(bn2(conv2(relu(bn1(conv1(x)))))): nothing of x is added back."""
    torch.manual_seed(0)
    model = create_model("plain20", num_classes=10).eval()
    randomize_bn(model)
    block = model.layer1[1]
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))
        torch.testing.assert_close(block(x), expected)


def test_zero_init_leaves_plain_blocks_alone():
    """zero_init_residual zeroes the last BN of a residual branch; in a plain block that BN carries the whole
    signal, so the option is a no-op there (every block's last BN starts at 1)."""
    model = create_model("plain20", num_classes=10, zero_init_residual=True)
    assert all(bool((b.bn2.weight == 1).all()) for b in model.modules() if hasattr(b, "bn2"))
    x = torch.randn(2, 3, 16, 16)
    assert model.eval()(x).abs().sum() > 0


def test_plain_nets_reject_shortcut_and_stochastic_depth():
    with pytest.raises(TypeError, match="no shortcut"):
        create_model("plain20", shortcut="B")
    with pytest.raises(ValueError, match="stochastic depth needs a shortcut"):
        create_model("plain20", final_survival_prob=0.8)


def test_no_block_is_removable_by_depth_pruning():
    """Depth pruning removes residual blocks (act(x + f(x)) -> x); a plain net has none."""
    assert removable_blocks(create_model("plain20", num_classes=10), (3, 16, 16)) == {}


def test_depth_pruning_a_plain_net_is_one_user_error():
    from deploycraft.stages.prune import PruneConfig, choose_blocks

    class _Data:
        def train_epoch(self, *args, **kwargs):  # never reached: the check comes first
            raise AssertionError

    cfg = PruneConfig(remove_blocks=1, channel_ratio=0.0)
    with pytest.raises(UserError, match="only 0 residual blocks"):
        choose_blocks(create_model("plain20", num_classes=10), _Data(), (3, 16, 16), cfg)


def test_int8_for_onnxruntime_runs_every_conv_quantized(tmp_path):
    """No residual adds to fuse: every conv becomes a QLinearConv and nothing stays in float."""
    torch.manual_seed(0)
    model = create_model("plain20", num_classes=10, in_chans=1).eval()
    randomize_bn(model)
    qmodel = insert_quantizers(model, "onnxruntime-cpu")
    for _, q in act_quantizers(qmodel):
        q.start_calibration()
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        qmodel(x)
    for _, q in act_quantizers(qmodel):
        q.finish_calibration("max", 100.0)
    path = tmp_path / "int8.onnx"
    export_onnx(qmodel, x[:2], path)
    ops = optimized_op_counts(path, tmp_path)
    assert ops.get("QLinearConv") == 19 and ops.get("Conv", 0) == 0 and ops.get("FusedConv", 0) == 0
    assert ops.get("QLinearAdd", 0) == 0
