"""Quantization-aware training on a tiny ResNet-20 (16 px synthetic data): it repairs a deliberately bad
PTQ result, its export has the PTQ file's graph, and a QAT killed after an epoch resumes bit-identical."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from onnx import numpy_helper

from deploycraft.config import DataConfig
from deploycraft.data import build_data
from deploycraft.deployables import QuantSettings, build_deployable, export_deployable
from deploycraft.errors import UserError
from deploycraft.evaluate import top1, torch_predictor
from deploycraft.models import create_model
from deploycraft.stages.quantize import QATConfig, qat_finetune
from deploycraft.stages.train import TrainConfig, train_epochs
from tests.conftest import killed_after_epoch

NO_AUG = {"crop_padding": 0, "hflip": False, "batch_size": 64}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A float ResNet-20 trained to ~95 % on the synthetic classes, and its data."""
    data = build_data(DataConfig(dataset="synthetic", image_size=16, channels=3, train_subset=1024, val_subset=256))
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=3)
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.05, warmup_epochs=0.5, eval_each_epoch=False)
    train_epochs(model, data, cfg, tmp_path_factory.mktemp("train"), 0)
    return model.eval(), data


def _ptq(model, data, path, percentile: float):
    images, _ = data.calibration_images(64)
    settings = QuantSettings("percentile", percentile)
    return build_deployable(
        model, "int8", path, data.sample_input(2), settings=settings, calibration=(images, data.spec), show=False
    )


def test_qat_repairs_a_bad_ptq_result(trained, tmp_path):
    model, data = trained
    fp32 = top1(torch_predictor(model), data)
    # Clipping activations at their 80th percentile ruins PTQ; fine-tuning adapts the weights to the clip.
    built = _ptq(model, data, tmp_path / "ptq.onnx", 80.0)
    ptq = top1(torch_predictor(built.module), data)
    assert fp32 > 0.8 and ptq < fp32 - 0.3, (fp32, ptq)
    history = qat_finetune(built.module, data, QATConfig(epochs=1, lr=0.01, **NO_AUG), tmp_path / "qat", 0)
    qat = top1(torch_predictor(built.module), data)
    assert qat == history[-1]["val_top1"]
    assert qat > ptq + 0.3, (ptq, qat)


def test_learned_scales_repair_more_and_return_to_buffers(trained, tmp_path):
    model, data = trained
    built = _ptq(model, data, tmp_path / "ptq.onnx", 80.0)
    fixed, learned = copy.deepcopy(built.module), built.module
    before = {k: v.clone() for k, v in learned.state_dict().items() if k.endswith("scale")}
    qat_finetune(fixed, data, QATConfig(epochs=1, lr=0.01, **NO_AUG), tmp_path / "fixed", 0)
    qat_finetune(learned, data, QATConfig(epochs=1, lr=0.01, learnable_scales=True, **NO_AUG), tmp_path / "lsq", 0)
    after = learned.state_dict()
    assert all(not n.endswith("scale") for n, _ in learned.named_parameters())  # buffers again: exportable
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before[k], fixed.state_dict()[k]) for k in before)
    assert top1(torch_predictor(learned), data) > top1(torch_predictor(fixed), data)


def _graph(path):
    proto = onnx.load(str(path))
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in proto.graph.node]
    inits = {t.name: (t.data_type, tuple(t.dims)) for t in proto.graph.initializer}
    return nodes, inits, {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.parametrize("target", ["onnxruntime-cpu", "tensorrt"])
def test_qat_file_has_the_ptq_graph(trained, tmp_path, target):
    model, data = trained
    images, _ = data.calibration_images(64)
    built = build_deployable(
        model, "int8", tmp_path / "ptq.onnx", data.sample_input(2), target=target,
        calibration=(images, data.spec), show=False,
    )  # fmt: skip
    cfg = QATConfig(epochs=1, lr=0.01, learnable_scales=True, **NO_AUG)
    qat_finetune(built.module, data, cfg, tmp_path / "qat", 0, teacher=model)
    export_deployable(built.module, "int8", tmp_path / "qat.onnx", data.sample_input(2), target)
    ptq_nodes, ptq_inits, ptq_values = _graph(tmp_path / "ptq.onnx")
    qat_nodes, qat_inits, qat_values = _graph(tmp_path / "qat.onnx")
    assert qat_nodes == ptq_nodes
    assert qat_inits == ptq_inits
    # Same graph, other numbers: the weights (INT8 initializers) and scales were trained.
    changed = [k for k in ptq_values if not (ptq_values[k] == qat_values[k]).all()]
    assert any(ptq_values[k].dtype == "int8" for k in changed) and len(changed) > len(ptq_values) // 4


def test_killed_qat_resumes_bit_identical(trained, tmp_path, monkeypatch):
    """Raise right after the first epoch's checkpoint; the re-run resumes and ends with the same weights."""
    model, data = trained
    built = _ptq(model, data, tmp_path / "ptq.onnx", 99.99)
    cfg = QATConfig(epochs=2, lr=0.01, learnable_scales=True, batch_size=128)  # with augmentation
    reference = copy.deepcopy(built.module)
    qat_finetune(reference, data, cfg, tmp_path / "reference", 0, teacher=copy.deepcopy(model))

    with killed_after_epoch(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        qat_finetune(copy.deepcopy(built.module), data, cfg, tmp_path / "killed", 0, teacher=copy.deepcopy(model))
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = copy.deepcopy(built.module)
    history = qat_finetune(resumed, data, cfg, tmp_path / "killed", 0, teacher=copy.deepcopy(model))
    assert [h["epoch"] for h in history] == [1, 2]
    ref_state, state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == state.keys()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    assert any(not torch.equal(ref_state[k], built.module.state_dict()[k]) for k in ref_state)


# The tiny folded ResNet-20 fine-tuned with KD at a peak lr of 0.05 or more: its loss runs from 0.1 to over 2
# within six steps and the model ends near chance; at 0.025 it does not run away (measured on this fixture).
DIVERGING = {"lr": 0.05, "epochs": 1, **NO_AUG}


def _states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diverging_qat_starts_the_epoch_again_at_half_the_learning_rate(trained, tmp_path):
    model, data = trained
    built = _ptq(model, data, tmp_path / "ptq.onnx", 99.99)
    ptq = top1(torch_predictor(built.module), data)
    once = copy.deepcopy(built.module)
    history = qat_finetune(once, data, QATConfig(**DIVERGING), tmp_path / "once", 0, teacher=copy.deepcopy(model))
    (record,) = history
    assert record["lr_scale"] == 0.25  # peak 0.05, then 0.025 (which still runs away), then 0.0125
    assert [r["lr_scale"] for r in record["restarts"]] == [0.5, 0.25]
    assert all(1 < r["step"] < 16 for r in record["restarts"])
    assert record["val_top1"] > ptq - 0.05  # not the runaway: 20 % at 0.05 without the guard (measured)
    # Twice the lr, three restarts: the last attempt at a peak of 0.0125 like the first run's third one. Each
    # attempt starts from the exact state the epoch began with (weights, momentum), so the weights end equal.
    twice = copy.deepcopy(built.module)
    cfg = QATConfig(**{**DIVERGING, "lr": 0.1, "divergence_retries": 3})
    history = qat_finetune(twice, data, cfg, tmp_path / "twice", 0, teacher=copy.deepcopy(model))
    assert [r["lr_scale"] for r in history[0]["restarts"]] == [0.5, 0.25, 0.125]
    assert _states_equal(once, twice)
    assert ptq > 0.9


def test_qat_divergence_without_retries_left_is_one_error_naming_the_lr(trained, tmp_path):
    model, data = trained
    built = _ptq(model, data, tmp_path / "ptq.onnx", 99.99)
    for retries, lr, words in (
        (0, 0.05, "QAT diverged: the median of the last 5 step losses rose"),
        (1, 0.1, "after 1 restart"),
    ):
        cfg = QATConfig(**{**DIVERGING, "lr": lr, "divergence_retries": retries})
        with pytest.raises(UserError) as err:
            qat_finetune(copy.deepcopy(built.module), data, cfg, tmp_path / f"r{retries}", 0, copy.deepcopy(model))
        assert err.value.field == "stages.quantize.qat.lr"
        assert words in str(err.value) and "epoch 1, step" in str(err.value)
        assert f"below {lr / 2**retries:g}" in err.value.fix


def test_killed_qat_resumes_after_a_restart_bit_identical(trained, tmp_path, monkeypatch):
    """The first epoch diverges and restarts at a lower lr; a kill after it, and the re-run's second epoch
    keeps that lr (the checkpoint holds it) and ends with the uninterrupted run's weights."""
    model, data = trained
    built = _ptq(model, data, tmp_path / "ptq.onnx", 99.99)
    cfg = QATConfig(**{**DIVERGING, "epochs": 2})
    reference = copy.deepcopy(built.module)
    history = qat_finetune(reference, data, cfg, tmp_path / "reference", 0, teacher=copy.deepcopy(model))
    assert [r["lr_scale"] for r in history[0]["restarts"]] == [0.5, 0.25]  # two epochs: a slower decay
    assert "restarts" not in history[1] and history[1]["lr_scale"] == 0.25
    with killed_after_epoch(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        qat_finetune(copy.deepcopy(built.module), data, cfg, tmp_path / "killed", 0, teacher=copy.deepcopy(model))
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["lr_scale"] == 0.25
    resumed = copy.deepcopy(built.module)
    again = qat_finetune(resumed, data, cfg, tmp_path / "killed", 0, teacher=copy.deepcopy(model))
    timeless = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert timeless(again) == timeless(history)
    assert _states_equal(reference, resumed)


def test_a_learned_scale_pushed_through_zero_computes_the_same_in_training_and_in_the_file():
    """LSQ can drive a weight channel's scale (or an activation scale) below zero; the step used in training is
    its absolute value, and the buffer kept for export is that same step (the flagship at 4 bits had 457 weight
    scales clamped to ~0 at export before, and its file agreed with its simulation on 88 % of images)."""
    from deploycraft.quant.modules import ActQuantizer, QuantConv2d

    torch.manual_seed(0)
    conv = QuantConv2d.from_float(torch.nn.Conv2d(4, 3, 3, padding=1), bits=4)
    act = ActQuantizer("s8")
    act.set_range(-2.0, 2.0)
    act.mode = "quantize"
    x = torch.randn(2, 4, 8, 8)
    for m in (conv, act):
        m.learn_scale(True)
    with torch.no_grad():
        conv.weight_scale[1] = -conv.weight_scale[1]  # pushed through zero by SGD
        conv.weight_scale[2] = -1e-20  # and to nothing
        act.scale.neg_()
    conv.train(), act.train()
    trained = act(conv(x)).detach()
    for m in (conv, act):
        m.learn_scale(False)
    conv.eval(), act.eval()
    with torch.no_grad():
        assert torch.equal(act(conv(x)), trained)
    assert float(conv.weight_scale.min()) > 0 and float(act.scale) > 0


def test_a_live_bn_conv_computes_the_folded_conv_and_folds_into_the_same_numbers(trained, tmp_path):
    """qat.bn_fold: after gives each folded conv its BN back. Evaluated, the simulation is the PTQ one (the same
    folded weights, to float32 rounding); after training steps in batch-statistics mode the running statistics
    moved, and folding them in at the end changes no output of the evaluated simulation."""
    from deploycraft.quant.graph import attach_live_bn, fold_bn
    from deploycraft.quant.modules import fold_live_bn

    model, data = trained
    built = _ptq(model, data, tmp_path / "ptq.onnx", 99.99)
    pairs: dict = {}
    fold_bn(model, pairs)
    live = copy.deepcopy(built.module)
    names = attach_live_bn(live, pairs)
    assert len(names) == 21 and "conv1" in names  # ResNet-20: the stem, 2 convs in each of 9 blocks, 2 shortcuts
    x = data.sample_input(32)
    ptq_convs = dict(built.module.named_modules())
    with torch.no_grad():
        for name in names:  # unfolded and folded again in float32: the PTQ weights to a few ulp
            w, b = live.get_submodule(name).folded()
            assert torch.allclose(w, ptq_convs[name].weight, rtol=1e-5, atol=1e-7), name
            assert torch.allclose(b, ptq_convs[name].bias, rtol=1e-5, atol=1e-6), name
        ptq_out, live_out = built.module.eval()(x), live.eval()(x)
    assert (live_out.argmax(1) == ptq_out.argmax(1)).all()
    assert torch.allclose(live_out, ptq_out, atol=0.01 * float(ptq_out.abs().max())), (live_out - ptq_out).abs().max()
    bn = live.get_submodule(names[3]).live_bn
    before = bn.running_mean.clone()
    live.train()
    opt = torch.optim.SGD(live.parameters(), lr=0.01)
    for xb, yb in data.train_epoch(64, 0, None):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(live(xb), yb).backward()
        opt.step()
    assert not torch.equal(before, bn.running_mean) and bn.weight.grad is not None
    with torch.no_grad():
        unfolded = live.eval()(x)
        assert fold_live_bn(live) == 21
        assert torch.equal(live(x), unfolded)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in live.modules())


def test_a_live_bn_conv_trains_as_conv_then_batchnorm():
    """With its weight in float, the live conv in training is exactly conv -> BN with batch statistics: the same
    output and the same running statistics (the fold factor it divides by cancels only if applied right)."""
    from deploycraft.quant.modules import QuantConv2d

    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0), bn.bias.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2.0)
        bn.weight[2] = -0.7  # a negative gamma flips the fold factor's sign
    live = QuantConv2d.from_float(torch.nn.Conv2d(3, 8, 3, padding=1))
    live.attach_bn(conv, bn)
    live.quantize_weight = False
    reference = torch.nn.Sequential(conv, bn).train()
    live.train()
    x = torch.randn(16, 3, 8, 8)
    assert torch.allclose(live(x), reference(x), atol=1e-5)
    assert torch.allclose(live.live_bn.running_mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(live.live_bn.running_var, bn.running_var, atol=1e-5)
    live.eval(), reference.eval()
    assert torch.allclose(live(x), reference(x), atol=1e-5)  # eval: the fold with the running statistics


def test_qat_with_bn_folded_after_repairs_a_bad_ptq_result_and_exports_the_ptq_graph(trained, tmp_path):
    model, data = trained
    built = _ptq(model, data, tmp_path / "ptq.onnx", 80.0)
    ptq = top1(torch_predictor(built.module), data)
    pairs: dict = {}
    from deploycraft.quant.graph import fold_bn

    fold_bn(model, pairs)
    cfg = QATConfig(epochs=1, lr=0.01, bn_fold="after", **NO_AUG)
    history = qat_finetune(built.module, data, cfg, tmp_path / "qat", 0, bn_pairs=pairs)
    trained_state = torch.load(tmp_path / "qat" / "checkpoint.pt", weights_only=True)["model"]
    assert sum(k.endswith("live_bn.running_var") for k in trained_state) == 21  # it trained them live
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in built.module.modules())
    qat = top1(torch_predictor(built.module), data)
    assert qat == history[-1]["val_top1"] and qat > ptq + 0.3, (ptq, qat)
    export_deployable(built.module, "int8", tmp_path / "qat.onnx", data.sample_input(2))
    assert _graph(tmp_path / "qat.onnx")[:2] == _graph(tmp_path / "ptq.onnx")[:2]
    with pytest.raises(UserError) as err:  # nothing to unfold: one clear error
        qat_finetune(built.module, data, cfg, tmp_path / "again", 0, bn_pairs={})
    assert err.value.field == "stages.quantize.qat.bn_fold"


def test_killed_qat_with_live_bn_resumes_bit_identical(trained, tmp_path, monkeypatch):
    from deploycraft.quant.graph import fold_bn

    model, data = trained
    built = _ptq(model, data, tmp_path / "ptq.onnx", 99.99)
    pairs: dict = {}
    fold_bn(model, pairs)
    cfg = QATConfig(epochs=2, lr=0.01, bn_fold="after", batch_size=128)
    reference = copy.deepcopy(built.module)
    qat_finetune(reference, data, cfg, tmp_path / "reference", 0, bn_pairs=pairs)
    with killed_after_epoch(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        qat_finetune(copy.deepcopy(built.module), data, cfg, tmp_path / "killed", 0, bn_pairs=pairs)
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and any("live_bn.running_var" in k for k in state["model"])
    resumed = copy.deepcopy(built.module)
    qat_finetune(resumed, data, cfg, tmp_path / "killed", 0, bn_pairs=pairs)
    ref_state, got = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == got.keys() == built.module.state_dict().keys()
    assert all(torch.equal(ref_state[k], got[k]) for k in ref_state)


@pytest.mark.parametrize(
    "losses, trips_at",
    [
        ([0.0301, 0.1386, 2.87, 42.1, 74.6], 5),  # ResNet-56-SD, QAT+KD at lr 0.002 (measured): trips at step 5
        ([0.24, 0.49, 0.74, 0.57, 0.37, 0.23, 0.28, 0.31], None),  # the same model, CE: a bump that recovers
        ([2.30, 2.35, 2.9, 3.4, 2.2, 1.9] + [1.5] * 20, None),  # from scratch: a rise during warm-up
        ([2.3] * 5 + [12.0, 13.0, 13.0], 8),  # ... and a real runaway from there (5x 2.3 = 11.5)
        ([0.02] * 50 + [0.3, 0.4, 0.2], None),  # late spikes of a low loss that stay small
        ([0.03] * 20 + [50.0] + [0.03] * 10, None),  # one bad batch (or a last batch of one image)
        ([0.03] * 20 + [50.0, 50.0] + [0.03] * 10, None),  # two
        ([0.03, 50.0, 0.03, 0.03, 0.03, 0.03], None),  # one in the first steps, before the window is full
        ([0.03] * 20 + [0.6, 0.6, 0.6], 23),  # three in a row: the median moves
        ([0.1, 0.1, float("nan")], 3),  # non-finite at once
        ([0.1, 0.1, float("inf")], 3),
    ],
)
def test_the_divergence_watch_trips_on_a_runaway_loss_only(losses, trips_at):
    from deploycraft.stages.train import DivergenceWatch

    watch = DivergenceWatch()
    tripped = next((i + 1 for i, loss in enumerate(losses) if watch.diverged(loss)), None)
    assert tripped == trips_at


def test_the_divergence_watch_remembers_the_loss_before_the_epoch():
    """A runaway that starts in the last steps of an epoch is measured against the loss before it: the lowest
    value carries over (through the checkpoint), it is not the next epoch's first, already high, loss."""
    from deploycraft.stages.train import DivergenceWatch

    first = DivergenceWatch()
    assert not any(first.diverged(x) for x in [0.03] * 20 + [0.14, 0.5])
    second = DivergenceWatch(first.state())
    assert [second.diverged(x) for x in (2.9, 16.0, 13.0)] == [False, False, True]
    fresh = DivergenceWatch()  # what a per-epoch watch would see: never trips
    assert not any(fresh.diverged(x) for x in [2.9, 16.0] + [13.0] * 300)


def _offset_calls(calls: range, nan_at: int | None = None):
    """Cross-entropy plus a constant 100 on the given calls (1-based): the loss seen runs away, the gradients do
    not change; NaN on call ``nan_at``."""
    count = [0]

    def loss_fn(m, x, y):
        count[0] += 1
        logits = m(x)
        offset = 100.0 if count[0] in calls else float("nan") if count[0] == nan_at else 0.0
        return torch.nn.functional.cross_entropy(logits, y) + offset, logits

    return loss_fn


def test_a_restarted_epoch_is_the_epoch_run_at_half_the_lr(trained, tmp_path):
    """QAT's restart on a model that draws random numbers in training (stochastic depth): the first attempt
    runs away (a planted loss offset), the second runs at half the lr from the epoch's first state with the
    epoch's random draws, and ends bit-identical to a run started at half the lr."""
    _, data = trained

    def run(lr: float, loss_fn, name: str):
        torch.manual_seed(0)
        model = create_model("resnet20", num_classes=10, in_chans=3, final_survival_prob=0.5)
        cfg = QATConfig(epochs=1, lr=lr, divergence_retries=1, **NO_AUG)
        return model, train_epochs(model, data, cfg, tmp_path / name, 0, loss_fn)

    restarted, history = run(0.05, _offset_calls(range(3, 6)), "restarted")
    assert [r["lr_scale"] for r in history[0]["restarts"]] == [0.5] and history[0]["lr_scale"] == 0.5
    halved, plain = run(0.025, _offset_calls(range(0)), "halved")
    assert "restarts" not in plain[0] and "lr_scale" not in plain[0]
    assert _states_equal(restarted, halved)
    assert history[0]["train_loss"] == plain[0]["train_loss"]


def test_training_warns_of_a_runaway_loss_and_goes_on(trained, tmp_path):
    """Train, distill and prune fine-tuning have no restarts: a runaway is logged and recorded, the training
    itself is unchanged (the planted offset does not change the gradients)."""
    _, data = trained

    def run(loss_fn, name: str):
        torch.manual_seed(0)
        model = create_model("resnet20", num_classes=10, in_chans=3)
        cfg = TrainConfig(epochs=1, lr=0.05, **NO_AUG)
        return model, train_epochs(model, data, cfg, tmp_path / name, 0, loss_fn)

    warned, history = run(_offset_calls(range(3, 6)), "warned")
    assert history[0]["loss_ran_away"]["step"] == 5 and history[0]["loss_ran_away"]["loss"] > 50
    quiet, plain = run(_offset_calls(range(0)), "quiet")
    assert "loss_ran_away" not in plain[0] and _states_equal(warned, quiet)
    with pytest.raises(UserError, match=r"the loss became nan in epoch 1, step 9") as err:  # after the warning
        run(_offset_calls(range(3, 6), nan_at=9), "nan")
    assert err.value.field == "stages.train.lr"


def test_resumed_qat_counts_the_restarts_before_the_kill(trained, tmp_path, monkeypatch):
    """The checkpoint keeps the restarts used and the watch: after a kill, an epoch that runs away (a loss
    offset planted in epoch 2) with no retries left ends in the error at once, not in a third restart."""
    import deploycraft.distill as distill_module

    model, data = trained
    built = _ptq(model, data, tmp_path / "ptq.onnx", 99.99)
    cfg = QATConfig(**{**DIVERGING, "epochs": 2})
    with killed_after_epoch(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        qat_finetune(copy.deepcopy(built.module), data, cfg, tmp_path / "q", 0, teacher=copy.deepcopy(model))
    saved = torch.load(tmp_path / "q" / "checkpoint.pt", weights_only=True)
    assert saved["restarts_used"] == 2 and 0 < saved["watch"]["floor"] < 0.2
    epoch_batches, kd_loss = data.train_epoch, distill_module.kd_loss
    epoch_now = [0]

    def batches(batch_size, epoch, augment, shard=None, device=None):
        epoch_now[0] = epoch
        yield from epoch_batches(batch_size, epoch, augment, shard, device)

    def planted(*args, **kwargs):
        return kd_loss(*args, **kwargs) + (100.0 if epoch_now[0] == 1 else 0.0)

    monkeypatch.setattr(data, "train_epoch", batches)
    monkeypatch.setattr(distill_module, "kd_loss", planted)
    # at the lr the checkpoint kept (x0.25, the epoch's third step), not at x0.0625 after two more restarts
    with pytest.raises(UserError, match=r"epoch 2, step 3 \(learning rate 0\.00503\) \(after 2 restart\(s\)") as err:
        qat_finetune(copy.deepcopy(built.module), data, cfg, tmp_path / "q", 0, teacher=copy.deepcopy(model))
    assert err.value.field == "stages.quantize.qat.lr" and "below 0.0125" in err.value.fix


def test_the_train_and_distill_reports_say_when_the_loss_ran_away():
    from deploycraft.stages.distill import DistillStage
    from deploycraft.stages.train import TrainStage

    history = [{"epoch": 1}, {"epoch": 2, "loss_ran_away": {"step": 40, "lr": 0.1, "loss": 3.0, "lowest": 0.4}}]
    train = {"arch": "resnet20", "epochs": 2, "train_images": 64, "image_size": 16, "channels": 3, "batch_size": 8,
             "schedule": "cosine", "seconds": 1.0, "final_train_loss": 0.5, "history": history}  # fmt: skip
    report = {"dataset": "synthetic", "stages": {"train": train}}
    (line,) = [x for x in TrainStage.report_section(report) if x.startswith("resnet20")]
    assert "The loss ran away (epoch 2, step 40 at lr 0.1:" in line and "training went on" in line
    report["stages"]["train"]["history"] = history[:1]
    assert not any("ran away" in x for x in TrainStage.report_section(report))
    distill = {"teacher": "t", "top1_teacher": 0.9, "top1_student_before": 0.5, "top1_kd": 0.8, "history": history}
    assert any("epoch 2, step 40" in x for x in DistillStage.report_section({"stages": {"distill": distill}}))
