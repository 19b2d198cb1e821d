"""Points 4, 5 and 6: inputs that pass the schema but used to fail late (or hang, or eat memory) are
caught before any stage runs, by `validate` and `run` alike, with one line naming the field and fix."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from tests.conftest import run_cli, smoke_recipe, write_recipe
from tests.reliability.conftest import one_line_error


def _both(tmp_path, raw, *needles):
    """validate and run give the same one-line error, and run writes nothing."""
    path = write_recipe(tmp_path / "r.yaml", raw)
    a = one_line_error(run_cli("validate", path), *needles)
    out = tmp_path / "run"
    b = one_line_error(run_cli("run", path, "-o", out), *needles)
    assert a == b
    assert not out.exists()
    return a


# --- point 4: YAML that costs memory or recursion -------------------------------------------------


def test_alias_bomb_under_model_kwargs(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        prev = chr(ord("a") + i - 1)
        levels.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [{', '.join(['*' + prev] * 10)}]")
    text = "name: bomb\nmodel:\n  arch: resnet20\n  kwargs:\n" + "".join(f"    {line}\n" for line in levels)
    text += "stages: [{type: train}]\n"
    path = write_recipe(tmp_path / "bomb.yaml", text)
    started = time.time()
    proc = run_cli("validate", path)
    assert time.time() - started < 20
    one_line_error(proc, "expands to more than")
    one_line_error(run_cli("run", path, "-o", tmp_path / "run"), "expands to more than")
    assert not (tmp_path / "run").exists()


def test_deep_nesting(tmp_path):
    text = (
        "name: deep\nmodel: {arch: resnet20, kwargs: {x: " + "[" * 20000 + "]" * 20000 + "}}\nstages: [{type: train}]\n"
    )
    path = write_recipe(tmp_path / "deep.yaml", text)
    one_line_error(run_cli("validate", path), "nests deeper than")


def test_self_referencing_alias(tmp_path):
    text = "name: loop\nmodel:\n  arch: resnet20\n  kwargs: &k {x: *k}\nstages: [{type: train}]\n"
    path = write_recipe(tmp_path / "loop.yaml", text)
    proc = run_cli("validate", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_merge_keys_are_plain_data(tmp_path):
    """`<<: *anchor`, which safe_load accepts, merges mappings: the mapping's own keys win, then the merged
    mappings in the order listed."""
    from deploycraft.recipe import load_recipe, parse_yaml

    data = parse_yaml("a: &a {x: 1, y: 2}\nb: &b {x: 9, z: 3}\nc: {<<: [*a, *b], y: 5}\n", "t")
    assert data["c"] == {"x": 1, "y": 5, "z": 3} and data["a"] == {"x": 1, "y": 2}
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    text = (
        "name: merge\nmodel: &m {arch: resnet20, num_classes: 10}\ndata: {dataset: synthetic, image_size: 16}\n"
        "stages:\n  - {type: train, epochs: 1}\n"
        f"  - {{type: distill, epochs: 1, teacher: {{<<: *m, weights: {weights}}}}}\n  - {{type: export}}\n"
    )
    teacher = load_recipe(write_recipe(tmp_path / "r.yaml", text)).stages[1].teacher
    assert (teacher.arch, teacher.num_classes, teacher.weights) == ("resnet20", 10, weights)


def _merge_chain(levels: int, fan: int) -> str:
    """Each level merges ``fan`` aliases of the one before: without bounds, the copied pairs multiply."""
    lines = ["a: &a {" + ", ".join(f"k{i}: {i}" for i in range(fan)) + "}"]
    for i in range(1, levels):
        prev, here = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{here}: &{here} {{<<: [{', '.join(['*' + prev] * fan)}]}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text, needle",
    [
        (
            "a: &a {" + ", ".join(f"k{i}: {i}" for i in range(100)) + "}\nb: {<<: [" + ", ".join(["*a"] * 300) + "]}\n",
            "merge keys (<<) copy more than 20,000 values",
        ),
        ("a: &a {x: 1, <<: *a}\n", "refers to the mapping that contains it"),
        ("a: {<<: !!python/object/apply:os.system {}}\n", "is not allowed"),
        ("a: {<<: [{x: 1}, !!python/name:os.system {}]}\n", "is not allowed"),
        ("a: &a {x: 1}\nb: {<<: *a, y: 2, y: 3}\n", "duplicate key 'y'"),
        ("a: {<<: 5}\n", "takes a mapping or a list of mappings"),
    ],
)
def test_merge_keys_keep_the_protections(tmp_path, text, needle):
    from deploycraft.errors import UserError
    from deploycraft.recipe import parse_yaml

    with pytest.raises(UserError) as info:
        parse_yaml(text, "r.yaml")
    assert needle in info.value.one_line() and info.value.source == "r.yaml"


def test_a_chain_of_merges_stays_small_and_fast():
    from deploycraft.recipe import parse_yaml

    started = time.time()
    data = parse_yaml(_merge_chain(12, 10), "r.yaml")  # 10^12 pairs if every merge copied every pair
    assert time.time() - started < 5 and data["l"] == {f"k{i}": i for i in range(10)}


# --- point 5: failures found only at run time before ----------------------------------------------


@pytest.mark.parametrize("arch", ["densenet_bc_100_12", "highway_fc"])
def test_feature_distillation_needs_stage_outputs(tmp_path, arch):
    raw = smoke_recipe(model={"arch": arch})
    raw["stages"].insert(1, {"type": "prune", "channel_ratio": 0.2})
    raw["stages"].insert(2, {"type": "distill", "epochs": 1, "feature_weight": 1.0})
    _both(tmp_path, raw, "stages.2.feature_weight", "has none")


def _calibration(tmp_path, write) -> dict:
    path = tmp_path / "calib.npz"
    write(path)
    return smoke_recipe(data={"calibration": str(path)})


CALIBRATION = {
    "not_a_zip": (lambda p: p.write_text("hello"), "cannot read calibration file"),
    "truncated": (
        lambda p: (
            np.savez(p, images=np.zeros((4, 3, 16, 16), np.uint8), labels=np.zeros(4, np.int64)),
            p.write_bytes(p.read_bytes()[:300]),
        ),
        "cannot read calibration file",
    ),
    "zero_images": (
        lambda p: np.savez(p, images=np.zeros((0, 3, 16, 16), np.uint8), labels=np.zeros(0, np.int64)),
        "0 images",
    ),
    "two_channels": (
        lambda p: np.savez(p, images=np.zeros((4, 2, 16, 16), np.uint8), labels=np.zeros(4, np.int64)),
        "2 channels",
    ),
    "empty_images": (
        lambda p: np.savez(p, images=np.zeros((8, 3, 0, 0), np.uint8), labels=np.zeros(8, np.int64)),
        "the images are 0x0 pixels",
    ),
    "nhwc": (
        lambda p: np.savez(p, images=np.zeros((4, 16, 16, 3), np.uint8), labels=np.zeros(4, np.int64)),
        "looks like NHWC",
    ),
    "float_labels": (
        lambda p: np.savez(p, images=np.zeros((4, 3, 16, 16), np.uint8), labels=np.full(4, 0.5)),
        "not integers",
    ),
    "no_labels": (lambda p: np.savez(p, images=np.zeros((4, 3, 16, 16), np.uint8)), "no labels array"),
    "pickled": (
        lambda p: np.savez(p, images=np.array([object()], dtype=object), labels=np.zeros(1)),
        "cannot read calibration file",
    ),
}


@pytest.mark.parametrize("case", sorted(CALIBRATION))
def test_bad_calibration_file(tmp_path, case):
    write, needle = CALIBRATION[case]
    _both(tmp_path, _calibration(tmp_path, write), "data.calibration", needle)


def test_calibration_resolution_is_resized_with_a_warning(tmp_path):
    raw = _calibration(
        tmp_path, lambda p: np.savez(p, images=np.zeros((8, 3, 20, 20), np.uint8), labels=np.zeros(8, np.int64))
    )
    proc = run_cli("validate", write_recipe(tmp_path / "r.yaml", raw))
    assert proc.returncode == 0, proc.stderr
    assert "warning" in proc.stderr and "20x20" in proc.stderr and "resized" in proc.stderr


def _checkpoint(tmp_path, obj_or_bytes) -> dict:
    path = tmp_path / "w.pt"
    if isinstance(obj_or_bytes, bytes):
        path.write_bytes(obj_or_bytes)
    else:
        torch.save(obj_or_bytes, path)
    return smoke_recipe(model={"arch": "resnet20", "weights": str(path)})


def _state(**changes):
    from deploycraft.models import create_model

    state = create_model("resnet20", num_classes=10).state_dict()
    state.update(changes)
    return state


CHECKPOINTS = {
    "zero_bytes": (b"", "is empty"),
    "text": (b"not a checkpoint", "cannot load checkpoint"),
    "unknown_layer_type": (
        {"format": "deploycraft.model/1", "spec": {"widths": {"layer1.0.conv1": {"type": "Lambda"}}}},
        "cannot be built",
    ),
    "bad_layer_kwargs": (
        {"format": "deploycraft.model/1", "spec": {"widths": {"conv1": {"type": "Conv2d", "colour": 3}}}},
        "cannot be built",
    ),
    "spec_not_a_dict": ({"format": "deploycraft.model/1", "spec": [1, 2]}, "spec is not a mapping"),
    "nan_weights": ({"state_dict": "nan"}, "NaN or infinite"),
    "inf_buffer": ({"state_dict": "inf"}, "NaN or infinite values in layer1.0.bn1.running_mean"),
    # finite, so the NaN check passes; the quantize stage's histograms failed on the NaNs it makes
    "negative_bn_variance": ({"state_dict": "negvar"}, "negative BatchNorm running variance in bn1.running_var"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_bad_checkpoint(tmp_path, case):
    obj, needle = CHECKPOINTS[case]
    if obj == {"state_dict": "nan"}:
        obj = _state(**{"conv1.weight": torch.full_like(_state()["conv1.weight"], float("nan"))})
    elif obj == {"state_dict": "inf"}:
        obj = _state(**{"layer1.0.bn1.running_mean": torch.full((16,), float("inf"))})
    elif obj == {"state_dict": "negvar"}:
        obj = _state(**{"bn1.running_var": torch.full((16,), -1.0)})
    _both(tmp_path, _checkpoint(tmp_path, obj), "model.weights", needle)


def test_a_non_strict_checkpoint_that_matches_nothing_is_refused(tmp_path):
    """strict=false loads what matches; where nothing but the classifier would, the run would ship an untrained
    model as loaded."""
    raw = _checkpoint(tmp_path, {"foo.weight": torch.zeros(3, 3), "fc.weight": _state()["fc.weight"]})
    raw["model"]["strict"] = False
    _both(tmp_path, raw, "model.weights", "none of the checkpoint's 2 key(s)", "untrained")
    # a partial match still loads (the point of strict=false)
    partial = {k: v for k, v in _state().items() if k.startswith(("conv1", "bn1", "layer1"))}
    raw = _checkpoint(tmp_path, {**partial, "extra.weight": torch.zeros(2)})
    raw["model"]["strict"] = False
    assert run_cli("validate", write_recipe(tmp_path / "p.yaml", raw)).returncode == 0


def test_directory_as_checkpoint_and_recipe(tmp_path):
    raw = smoke_recipe(model={"arch": "resnet20", "weights": str(tmp_path)})
    _both(tmp_path, raw, "model.weights", "is a directory")
    one_line_error(run_cli("validate", tmp_path), "is a directory")


@pytest.mark.parametrize("content, needle", [(None, "lacks"), (b"junk", "is not a gzip file")])
def test_fashion_mnist_root_is_used_or_an_error(tmp_path, content, needle):
    """An explicit data.root never falls back to the installed copy, and junk there is caught by validate."""
    from deploycraft.data import fashion_mnist

    root = tmp_path / "fmnist"
    root.mkdir()
    for name in fashion_mnist.FILES if content is not None else ():
        (root / name).write_bytes(content)
    raw = smoke_recipe(data={"dataset": "fashion-mnist", "root": str(root), "download": False, "channels": 1})
    _both(tmp_path, raw, "data.root", str(root), needle)


@pytest.mark.parametrize("extra", ["d", "z"])
def test_held_out_class_missing_from_training(tmp_path, extra):
    """val/ with a class train/ lacks (or a misspelt one) is refused, not silently left out of the evaluation."""
    from tests.data.test_datasets import make_imagefolder

    root = tmp_path / "data"
    make_imagefolder(root, classes=("a", "b", "c"), per_class=2, splits=("train",))
    make_imagefolder(root, classes=("a", "b", "c", extra), per_class=2, splits=("val",))
    raw = smoke_recipe(model={"arch": "resnet20", "num_classes": 3}, data={"dataset": "imagefolder", "root": str(root)})
    _both(tmp_path, raw, "data.val_split", str(root / "val"), f"({extra})")


def test_held_out_split_that_is_the_training_split(tmp_path):
    """`--set data.val_split=train` used to be accepted: the gates and the shipped top-1 measured on training
    images."""
    from tests.data.test_datasets import make_imagefolder

    root = make_imagefolder(tmp_path / "data", classes=("a", "b", "c"), per_class=2)
    raw = smoke_recipe(model={"arch": "resnet20", "num_classes": 3}, data={"dataset": "imagefolder", "root": str(root)})
    path = write_recipe(tmp_path / "r.yaml", raw)
    needles = ("data.val_split", "is also the training split", "training images")
    a = one_line_error(run_cli("validate", path, "--set", "data.val_split=train/."), *needles)
    assert a == one_line_error(
        run_cli("run", path, "--set", "data.val_split=train/.", "-o", tmp_path / "run"), *needles
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, needles",
    [
        ("model.in_chans=1", ("model.in_chans", "data.channels is 3")),
        ("model.kwargs.num_classes=5", ("model.kwargs", "model.num_classes")),
        ("seed=18446744073709551616", ("seed", "less than or equal to 1099511627776")),
    ],
)
def test_overrides_that_used_to_fail_in_train(tmp_path, override, needles):
    """Values that validate accepted but the train stage crashed on (rc 1): refused before anything runs."""
    path = write_recipe(tmp_path / "r.yaml", smoke_recipe())
    a = one_line_error(run_cli("validate", path, "--set", override), *needles)
    assert a == one_line_error(run_cli("run", path, "--set", override, "-o", tmp_path / "run"), *needles)
    assert not (tmp_path / "run").exists()


def test_remove_blocks_beyond_the_model(tmp_path):
    """Found by validate from the recipe's model (resnet20: 7 removable blocks), not after training."""
    raw = smoke_recipe()
    raw["stages"].insert(1, {"type": "prune", "channel_ratio": 0.0, "remove_blocks": 100})
    _both(tmp_path, raw, "stages.1.remove_blocks", "only 7 residual blocks", "use at most 7")
    raw["stages"][1]["remove_blocks"] = 7
    proc = run_cli("validate", write_recipe(tmp_path / "ok.yaml", raw))
    assert proc.returncode == 0, proc.stderr


def test_fewer_classes_than_the_data(tmp_path):
    _both(tmp_path, smoke_recipe(model={"arch": "resnet20", "num_classes": 5}), "model.num_classes", "10 classes")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r["stages"][0].update(lr=float("inf")), "stages.0.lr"),
        (lambda r: r["data"].update(mean=[float("nan")] * 3), "data.mean"),
        (lambda r: r["stages"][0].update(epochs=True), "stages.0.epochs"),
        (lambda r: r["stages"][0].update(hflip="yes"), "stages.0.hflip"),
        (lambda r: r["stages"][3].update(backends=[]), "stages.3.backends"),
    ],
)
def test_values_the_schema_refuses(tmp_path, mutate, field):
    raw = smoke_recipe()
    mutate(raw)
    _both(tmp_path, raw, field)


def test_verify_with_nothing_to_measure(tmp_path):
    raw = smoke_recipe()
    raw["stages"] = [raw["stages"][0], {**raw["stages"][3], "backends": ["onnxruntime"]}]
    _both(tmp_path, raw, "stages.1.backends", "nothing to measure")


def test_training_divergence_is_one_line_and_resumable(tmp_path):
    raw = smoke_recipe()
    raw["stages"][0].update(lr=1.0e6, warmup_epochs=0.0)
    path = write_recipe(tmp_path / "r.yaml", raw)
    out = tmp_path / "run"
    line = one_line_error(run_cli("run", path, "-o", out), "stages.train.lr", "diverged", after_progress=True)
    assert "lower the learning rate" in line
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    raw["stages"][0]["lr"] = 0.05
    proc = run_cli("run", write_recipe(path, raw), "-o", out)
    assert proc.returncode == 0, proc.stderr


# --- bench ----------------------------------------------------------------------------------------


def _onnx(tmp_path):
    from deploycraft.deployables import build_deployable
    from deploycraft.models import create_model

    path = tmp_path / "m.onnx"
    build_deployable(create_model("resnet20").eval(), "fp32", path, torch.randn(1, 3, 16, 16))
    return path


@pytest.mark.parametrize(
    "make, args, needle",
    [
        (lambda t: t / "m.txt", [], "does not exist"),
        (lambda t: _write(t / "e.onnx", b""), [], "is empty"),
        (lambda t: _write(t / "x.onnx", b"not onnx"), [], "not a valid ONNX model"),
        (lambda t: _truncated(t), [], "not a valid ONNX model"),
        (lambda t: _onnx(t), ["--batch", "0"], "--batch"),
        (lambda t: _onnx(t), ["--batch", "-4"], "--batch"),
        (lambda t: _onnx(t), ["--repeats", "0"], "--repeats"),
        (lambda t: t, [], "is a directory"),
    ],
)
def test_bench_bad_input(tmp_path, make, args, needle):
    one_line_error(run_cli("bench", make(tmp_path), *args), needle)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _truncated(tmp_path):
    path = _onnx(tmp_path)
    path.write_bytes(path.read_bytes()[:2000])
    return path


# --- point 6: minor -------------------------------------------------------------------------------


def test_written_files_follow_the_umask(completed):
    run, recipe = completed
    for rel in ("report.json", "run.json", "manifest.json", "deploy/model_int8.onnx"):
        assert (run / rel).stat().st_mode & 0o777 == 0o644, rel  # umask 022 in the test environment
    stage_files = [p for p in (run / "stages").rglob("*") if p.is_file()]
    assert stage_files and all(p.stat().st_mode & 0o777 == 0o644 for p in stage_files)


def test_killed_run_is_reported_interrupted(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    raw = smoke_recipe(data={"train_subset": 4096})
    raw["stages"][0]["epochs"] = 20
    path = write_recipe(tmp_path / "r.yaml", raw)
    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-m", "deploycraft", "run", str(path), "-o", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # A loaded machine (CI, other test workers) can take minutes to import torch and read the data:
    # wait long, and kill the run only once its train stage has started.
    deadline = time.time() + 600
    while time.time() < deadline and child.poll() is None and not list(out.glob("stages/*-train-*")):
        time.sleep(0.2)
    started = bool(list(out.glob("stages/*-train-*")))
    still_running = child.poll() is None
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert started and still_running, f"the run's train stage did not start (exit {child.returncode})"
    proc = run_cli("inspect", out)
    assert proc.returncode == 0 and "interrupted" in proc.stdout.splitlines()[0]


def test_validate_stays_small(tmp_path):
    """A bad recipe is refused by a whole CLI process (torch imported) in under 500 MB of memory."""
    import subprocess
    import sys

    raw = smoke_recipe()
    raw["stages"][0]["epochs"] = "x"
    path = write_recipe(tmp_path / "r.yaml", raw)
    report = tmp_path / "maxrss"
    code = (
        "import atexit, sys; out = sys.argv[1]; "
        # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak over the fork)
        "peak = lambda: next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')); "
        "atexit.register(lambda: open(out, 'w').write(str(peak()))); "
        "sys.argv = ['deploycraft'] + sys.argv[2:]; "
        "from deploycraft.cli import entrypoint; entrypoint()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(report), "validate", str(path)], capture_output=True, text=True
    )
    one_line_error(proc, "stages.0.epochs")
    assert int(report.read_text()) < 500 * 1024  # kB
