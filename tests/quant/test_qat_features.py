"""Feature distillation inside QAT: the stage outputs are found in the fx simulation (where hooks on ``layer1``
never fire), a QAT epoch trains 1x1 adapters from a wider FP32 teacher, a killed run resumes bit-identical,
and recipes that cannot have feature KD fail with one error before anything runs."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from deploycraft.config import DataConfig
from deploycraft.data import build_data
from deploycraft.deployables import QuantSettings, build_deployable
from deploycraft.distill import Distiller, FeatureTaps, GraphFeatureTaps, feature_loss, stage_modules
from deploycraft.errors import UserError
from deploycraft.models import create_model
from deploycraft.pruning import PruneSettings, pruned_copy
from deploycraft.quant.graph import stage_outputs
from deploycraft.quant.modules import ActQuantizer
from deploycraft.quant.placement import act_quantizers, insert_quantizers
from deploycraft.recipe import build_recipe
from deploycraft.stages.quantize import QATConfig, _qat_line, check_feature_kd, qat_finetune
from tests.conftest import killed_after_epoch, randomize_bn, run_cli, smoke_recipe, write_recipe

NO_AUG = {"crop_padding": 0, "hflip": False, "batch_size": 64}


def _float_simulation(gm):
    """The simulation with every quantizer off: what is left is the BN-folded float graph."""
    for _, q in act_quantizers(gm):
        q.mode = "off"
    for m in gm.modules():
        if hasattr(m, "quantize_weight"):
            m.quantize_weight = False
    return gm


@pytest.mark.parametrize("arch", ["resnet20", "preact_resnet20", "highway_conv"])
@pytest.mark.parametrize("target", ["onnxruntime-cpu", "tensorrt"])
def test_stage_outputs_in_the_simulation_are_the_models(arch, target):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_chans=3)
    randomize_bn(model)
    model.eval()
    gm = _float_simulation(insert_quantizers(model, target))
    names = stage_modules(gm)
    assert names == model.stage_names and names  # the stages travel with the traced copy ...
    assert stage_modules(copy.deepcopy(gm)) == names  # ... and survive the copy QAT's control makes
    # the tap reads the tensor the deployed graph carries: after the activation quantizer where one follows
    is_quantizer = lambda n: n.op == "call_module" and isinstance(gm.get_submodule(n.target), ActQuantizer)  # noqa: E731
    tapped = stage_outputs(gm, names).values()
    assert all(is_quantizer(n) or not any(is_quantizer(u) for u in n.users) for n in tapped)
    if target == "onnxruntime-cpu":  # which quantizes every residual add's output
        assert all(is_quantizer(n) for n in tapped)
    code = gm.code
    x = torch.randn(2, 3, 16, 16)
    hooks, taps = FeatureTaps(model, names), GraphFeatureTaps(gm, names)
    try:
        with torch.no_grad():
            model(x), gm(x)
    finally:
        hooks.close()
        taps.close()
    for n in names:
        a, b = hooks.outputs[n], taps.outputs[n]
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), n  # equal up to BN folding's rounding
    assert gm.code == code and not any("feature_tap" in n for n, _ in gm.named_modules())  # taps removed


def test_the_tapped_tensor_is_the_quantized_one(pruned_qat):
    """With the quantizers on, the student's stage features lie on the grid of the quantizer that follows."""
    _, qmodel, data = pruned_qat
    gm = copy.deepcopy(qmodel)
    names = stage_modules(gm)
    nodes = stage_outputs(gm, names)
    taps = GraphFeatureTaps(gm, names)
    try:
        with torch.no_grad():
            gm(data.sample_input(8))
    finally:
        taps.close()
    for n in names:
        q = gm.get_submodule(nodes[n].target)
        assert q.mode == "quantize"
        v = taps.outputs[n] / q.scale + q.zero_point
        assert torch.allclose(v, v.round(), atol=1e-3), n
        assert len(v.unique()) > 8  # not a degenerate, all-zero feature


def test_stage_outputs_name_what_is_missing():
    gm = insert_quantizers(create_model("resnet20", num_classes=10, in_chans=3).eval(), "onnxruntime-cpu")
    with pytest.raises(ValueError, match="'layer9' is not in the traced graph"):
        stage_outputs(gm, ["layer1", "layer9"])


@pytest.fixture(scope="module")
def pruned_qat(tmp_path_factory):
    """A wide FP32 teacher, its pruned copy calibrated as a simulation, and tiny synthetic data."""
    data = build_data(DataConfig(dataset="synthetic", image_size=16, channels=3, train_subset=256, val_subset=64))
    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=10, in_chans=3)
    randomize_bn(teacher)
    teacher.eval()
    student = pruned_copy(teacher, 0.5, PruneSettings(round_to=8), (3, 16, 16)).eval()
    images, _ = data.calibration_images(64)
    built = build_deployable(
        student, "int8", tmp_path_factory.mktemp("ptq") / "ptq.onnx", data.sample_input(2),
        settings=QuantSettings("max"), calibration=(images, data.spec), show=False,
    )  # fmt: skip
    return teacher, built.module, data


def test_feature_term_and_adapter_gradients(pruned_qat):
    teacher, qmodel, data = pruned_qat
    student = copy.deepcopy(qmodel)
    x, y = data.sample_input(16), torch.randint(0, 10, (16,))
    plain = Distiller(student, teacher, 4.0, 0.9, 0.0, x[:2])
    d = Distiller(student, teacher, 4.0, 0.9, 2.0, x[:2])
    try:
        assert any(isinstance(a, torch.nn.Conv2d) for a in d.adapters.adapters.values())  # pruned widths differ
        student.train()
        logit_loss, _ = plain.loss(student, x, y)
        loss, _ = d.loss(student, x, y)
        features = feature_loss(d.adapters, d.student_taps.outputs, d.teacher_taps.outputs)
        assert features > 0
        assert loss.item() == pytest.approx(logit_loss.item() + 2.0 * features.item(), rel=1e-5)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.adapters.parameters())
        assert all(p.grad is None for p in teacher.parameters())
    finally:
        d.close()
        plain.close()
    assert student.state_dict().keys() == qmodel.state_dict().keys()


def test_qat_with_features_trains_the_adapters_and_resumes_bit_identical(pruned_qat, tmp_path, monkeypatch):
    """One QAT run with feature KD to the end, one killed after its first epoch and re-run: same weights,
    same adapters; and the adapters moved away from their seeded start."""
    teacher, qmodel, data = pruned_qat
    cfg = QATConfig(epochs=2, lr=0.01, **NO_AUG)
    cfg.distill.feature_weight = 1.0
    reference = copy.deepcopy(qmodel)
    history = qat_finetune(reference, data, cfg, tmp_path / "reference", 0, teacher=copy.deepcopy(teacher))
    assert [h["epoch"] for h in history] == [1, 2]
    assert not any("feature_tap" in n for n, _ in reference.named_modules())  # exported as after PTQ
    adapters = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=True)["extra"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # as qat_finetune draws them
        start = Distiller(copy.deepcopy(qmodel), copy.deepcopy(teacher), 4.0, 0.9, 1.0, data.sample_input(2))
    start.close()
    initial = start.adapters.state_dict()
    assert initial.keys() == adapters.keys() and initial
    assert all(not torch.equal(initial[k], adapters[k]) for k in initial)

    killed = copy.deepcopy(qmodel)
    with killed_after_epoch(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        qat_finetune(killed, data, cfg, tmp_path / "killed", 0, teacher=copy.deepcopy(teacher))
    assert not any("feature_tap" in n for n, _ in killed.named_modules())
    resumed = copy.deepcopy(qmodel)
    assert [h["epoch"] for h in qat_finetune(resumed, data, cfg, tmp_path / "killed", 0, teacher=teacher)] == [1, 2]
    ref, got = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    resumed_adapters = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["extra"]
    assert all(torch.equal(adapters[k], resumed_adapters[k]) for k in adapters)


def test_report_line_names_feature_kd():
    qat = {"epochs": 1, "lr": 0.002, "schedule": "cosine", "learnable_scales": False, "top1_fp32": 0.9,
           "top1_ptq": 0.8, "top1_qat": 0.85, "ptq_file": "ptq/model_int8.onnx",
           "teacher": "the model before pruning"}  # fmt: skip
    assert "QAT with KD (logits only) from the model before pruning" in _qat_line(qat)
    assert "KD (logits and stage features, feature weight 0.5)" in _qat_line({**qat, "feature_weight": 0.5})
    weights = _qat_line({**qat, "alpha": 0.5, "temperature": 4.0})
    assert "KD (logits only, soft-target weight 0.5, T 4) from the model before pruning" in weights
    assert "BN folded and frozen" in weights  # runs before bn_fold was recorded: it did not exist
    live = _qat_line({**qat, "bn_fold": "after", "live_bn": 21})
    assert "BN trained with batch statistics in 21 conv(s) and folded at the end" in live and "frozen" not in live
    assert "diverged" not in live
    restarts = [{"step": 4, "lr": 0.00199, "lr_scale": 0.5}, {"step": 9, "lr": 0.000996, "lr_scale": 0.25}]
    restarted = _qat_line({**qat, "history": [{"epoch": 1, "restarts": restarts}, {"epoch": 2, "lr_scale": 0.25}]})
    assert "The loss diverged 2 time(s) (epoch 1, step 4 at lr 0.00199; epoch 1, step 9 at lr 0.000996)" in restarted
    assert "from epoch 1 on the peak lr was 0.0005." in restarted and "In the control" not in restarted
    control = _qat_line({**qat, "control_history": [{"epoch": 2, "restarts": restarts[:1]}]})
    assert " In the control, the loss diverged 1 time(s) (epoch 2, step 4 at lr 0.00199)" in control


# --- bad input: one error before anything runs ------------------------------------------------------------


def _recipe(arch: str = "resnet20", **distill) -> dict:
    raw = smoke_recipe(model={"arch": arch})
    raw["stages"][1] = {"type": "quantize", "num_calibration": 64, "method": "qat", "qat": {"distill": distill}}
    return raw


def test_feature_weight_without_distillation_is_one_error():
    with pytest.raises(UserError) as err:
        build_recipe(_recipe(enabled=False, feature_weight=1.0))
    assert err.value.field == "stages.1.qat.distill.feature_weight" and "enabled: true" in err.value.fix


def test_teacher_with_other_stages_is_one_error():
    with pytest.raises(UserError, match="do not match") as err:
        check_feature_kd(create_model("resnet20"), create_model("resnet18"), "resnet20", "stages.1.qat.distill.x")
    assert err.value.field == "stages.1.qat.distill.x"


def test_model_without_stages_fails_validate_with_exit_2(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", _recipe("densenet_bc_100_12", feature_weight=1.0))
    proc = run_cli("validate", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "stages.1.qat.distill.feature_weight" in proc.stderr and "has none" in proc.stderr


def test_qat_fine_tunes_with_the_augmentation_the_model_was_trained_with():
    """qat.crop_padding and qat.hflip left unset follow the last train (or distill) stage; set, they win; with
    no training stage in the recipe, the defaults (4-pixel crops, flips)."""
    from deploycraft.stages.quantize import qat_settings

    raw = smoke_recipe()
    raw["stages"][0].update(crop_padding=0, hflip=False)
    raw["stages"][1].update(method="qat")
    recipe = build_recipe(raw)
    q, source = qat_settings(recipe, recipe.stage("quantize").qat)
    assert (q.crop_padding, q.hflip, source) == (0, False, "the train stage")
    raw["stages"][1]["qat"] = {"hflip": True}
    recipe = build_recipe(raw)
    q, source = qat_settings(recipe, recipe.stage("quantize").qat)
    assert (q.crop_padding, q.hflip) == (0, True)
    quantize = recipe.stage("quantize").model_copy(update={"qat": QATConfig()})
    q, source = qat_settings(SimpleNamespace(stages=[quantize]), quantize.qat)  # a recipe that loads weights
    assert (q.crop_padding, q.hflip, source) == (4, True, "defaults")
    line = _qat_line({
        "epochs": 1, "lr": 0.002, "schedule": "cosine", "learnable_scales": False, "top1_fp32": 0.9, "top1_ptq": 0.8,
        "top1_qat": 0.85, "ptq_file": "ptq/model_int8.onnx",
        "augmentation": {"crop_padding": 0, "hflip": False, "from": "the train stage"},
    })  # fmt: skip
    assert "no crops and no flips (as in the train stage)" in line


def test_qat_key_tells_an_explicit_flip_from_an_inherited_one():
    """qat.hflip: true set in the recipe and hflip left unset (inherited as false from the train stage) dump
    alike; the augmentation QAT trains with joins the cache key, so the second recipe cannot reuse the first's
    quantize stage. PTQ ignores it."""
    from deploycraft.stages.quantize import QuantizeStage

    def key_fields(qat):
        raw = smoke_recipe()
        raw["stages"][0].update(crop_padding=0, hflip=False)
        raw["stages"][1].update(method="qat", qat=qat)
        recipe = build_recipe(raw)
        cfg = recipe.stage("quantize")
        return QuantizeStage.key_config(cfg), QuantizeStage.derived(recipe, cfg)

    explicit, inherited = key_fields({"hflip": True}), key_fields({})
    assert explicit[0] == inherited[0]  # the same dump ...
    assert explicit[1]["qat"] == {"crop_padding": 0, "hflip": True}  # ... different training
    assert inherited[1]["qat"] == {"crop_padding": 0, "hflip": False}
    raw = smoke_recipe()
    recipe = build_recipe(raw)
    assert "qat" not in QuantizeStage.derived(recipe, recipe.stage("quantize"))
