"""Real training runs on the bundled and generated data (small and fast)."""

import json

import pytest
import torch

from cnnserve.models.checkpoint import CheckpointError, classifier_from_checkpoint, load_checkpoint
from cnnserve.models.optim import OPTIMIZERS, augment, make_optimizer, make_schedule
from cnnserve.models.train import TrainConfig, train
from tests.conftest import run_cli


def test_default_run_reaches_97_percent(default_run):
    """The embedded default (LeNet-5 on digits) reaches the accuracy asked of it: 97% on the test split."""
    ckpt = torch.load(default_run / "model.pt", weights_only=True)  # plain data, no pickled objects
    assert ckpt["metrics"]["test_accuracy"] >= 0.97
    assert ckpt["metrics"]["n_test"] == 360
    assert ckpt["spec"]["labels"] == list("0123456789")
    assert ckpt["spec"]["height"] == 28 and ckpt["spec"]["channels"] == 1
    for name in ("model.pt", "last.pt", "metrics.json", "curves.png", "confusion.png"):
        assert (default_run / name).stat().st_size > 0
    assert (default_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((default_run / "metrics.json").read_text())
    assert len(metrics["epochs"]) == ckpt["metrics"]["epochs_run"]
    assert metrics["test"]["test_accuracy"] == ckpt["metrics"]["test_accuracy"]


def test_checkpoint_reproduces_its_accuracy(default_run):
    from cnnserve.models.data import load_dataset
    from cnnserve.models.train import evaluate
    from torch.utils.data import DataLoader

    ckpt = load_checkpoint(default_run)
    model = classifier_from_checkpoint(ckpt)
    data = load_dataset("digits", ckpt["spec"])
    result = evaluate(model, DataLoader(data.test, batch_size=100))
    assert result["accuracy"] == pytest.approx(ckpt["metrics"]["test_accuracy"], abs=1e-9)


def quick(tmp_path, **kw):
    return TrainConfig(**{"out": str(tmp_path / "run"), "epochs": 2, "limit": 200, "patience": 0, **kw})


def test_same_seed_same_result(tmp_path):
    """Two runs with one seed agree to the last digit; another seed gives another run (so the equality
    is the seed's doing, not an empty or constant history)."""
    a, b, c = (json.loads((train(quick(tmp_path / name, seed=seed), progress=False) / "metrics.json").read_text())
               for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert len(a["epochs"]) == 2 and strip(a["epochs"]) == strip(b["epochs"])
    assert [r["train_loss"] for r in c["epochs"]] != [r["train_loss"] for r in a["epochs"]]


def test_resume_continues_exactly(tmp_path):
    """Two epochs then a resume to four give the same history as four epochs straight.

    A constant schedule: a cosine schedule's shape depends on the planned epoch count."""
    straight = train(quick(tmp_path / "s", epochs=4, schedule="none"), progress=False)
    part = train(quick(tmp_path / "p", epochs=2, schedule="none"), progress=False)
    resumed = train(quick(tmp_path / "p", epochs=4, schedule="none"), resume=str(part / "last.pt"), progress=False)
    h1 = json.loads((straight / "metrics.json").read_text())["epochs"]
    h2 = json.loads((resumed / "metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in h2] == [1, 2, 3, 4]
    for r1, r2 in zip(h1, h2):
        assert r1["val_loss"] == pytest.approx(r2["val_loss"], rel=1e-5)
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-5)


def test_resume_needs_training_state(default_run):
    with pytest.raises(CheckpointError, match="holds no training state"):
        train(TrainConfig(out=str(default_run)), resume=str(default_run / "model.pt"), progress=False)


def test_early_stop_keeps_best_weights(tmp_path):
    run = train(quick(tmp_path, epochs=30, patience=2, lr=0.5, optimizer="sgd"), progress=False)
    m = json.loads((run / "metrics.json").read_text())
    best = max(r["val_accuracy"] for r in m["epochs"])
    assert m["test"]["val_accuracy"] == best
    assert m["test"]["epochs_run"] < 30  # stopped early


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_learns(tmp_path, optimizer):
    """Each optimizer moves the weights the right way: the loss falls by a tenth or more and the test
    accuracy clears chance (10 classes) by a wide margin. A step that did nothing would leave both."""
    run = train(quick(tmp_path, optimizer=optimizer, epochs=3, limit=400), progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"][-1]["train_loss"] < 0.9 * m["epochs"][0]["train_loss"]
    assert m["test"]["test_accuracy"] > 0.3


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_schedules_with_warmup(schedule):
    cfg = TrainConfig(epochs=10, schedule=schedule, warmup_epochs=2, step_size=3, gamma=0.5, lr=1.0, optimizer="sgd")
    opt = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    sched = make_schedule(cfg, opt, steps_per_epoch=5)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < 0.05 and lrs[9] > lrs[0]  # warm-up rises
    assert max(lrs) == pytest.approx(1.0, rel=0.05)
    assert lrs[-1] < 0.6  # and decays afterwards


@pytest.mark.parametrize("init", ["kaiming", "xavier"])
def test_rgb_training_with_augmentation(tmp_path, init):
    run = train(quick(tmp_path, arch="resnet18", data="shapes", img_size=32, init=init, epochs=1, limit=64,
                      batch_size=16), progress=False)
    ckpt = load_checkpoint(run)
    assert ckpt["spec"].channels == 3 and ckpt["train_config"]["augment"] is None
    assert ckpt["train_config"]["init"] == init
    assert ckpt["spec"].labels == ("circle", "square", "triangle", "cross")


@pytest.mark.parametrize("init", ["kaiming", "xavier"])
def test_init_schemes_give_their_published_spread(init):
    """Each large convolution's weights have the standard deviation of the scheme: Kaiming normal
    with fan-out, sqrt(2 / fan_out); Xavier uniform, sqrt(2 / (fan_in + fan_out)). Biases are zero."""
    from cnnserve import models
    from cnnserve.models.optim import init_weights

    torch.manual_seed(0)
    model = models.create_model("resnet18", num_classes=4, in_chans=3, img_size=32)
    init_weights(model, init)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 4096]
    assert convs
    for m in convs:
        out_c, in_c, kh, kw = m.weight.shape
        fan_in, fan_out = in_c * kh * kw, out_c * kh * kw
        want = (2 / fan_out) ** 0.5 if init == "kaiming" else (2 / (fan_in + fan_out)) ** 0.5
        assert float(m.weight.detach().std()) == pytest.approx(want, rel=0.1), (m, init)
        assert m.bias is None or float(m.bias.abs().max()) == 0.0


def test_augment_keeps_shape_and_content():
    """Every output image is its input shifted by at most an eighth of the side (zeros coming in)
    and maybe mirrored; across a batch both shifts and flips happen."""
    x = torch.randint(1, 256, (64, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    pad = 2
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    flipped = shifted = 0
    for i in range(len(x)):
        matches = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 16, dx:dx + 16]))]
        assert matches, f"image {i} is not a shifted (and maybe flipped) copy of its input"
        flipped += all(f for _, _, f in matches)
        shifted += all((dy, dx) != (pad, pad) for dy, dx, _ in matches)
    assert 10 < flipped < 54 and shifted > 32  # about half flipped, most shifted


def test_train_cli_end_to_end(tmp_path):
    proc = run_cli("train", "lenet5_classic", "--epochs", "1", "--limit", "100", "--out", tmp_path / "r",
                   "--optimizer", "momentum", "--schedule", "step", check=True)
    assert "epoch   1/1" in proc.stdout and "test accuracy" in proc.stdout
    assert load_checkpoint(tmp_path / "r").get("spec").height == 32


@pytest.mark.parametrize("args, message", [
    (["train", "resnet9000"], "valid names: alexnet"),
    (["train", "--data", "imagenet"], "valid: digits, mnist"),
    (["train", "--data", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist: data directory does not exist"),
    (["train", "--data", "folder"], "needs --data-dir"),
    (["train", "--resume", "/nonexistent/last.pt"], "/nonexistent/last.pt: no such file"),
])
def test_train_cli_bad_input_is_one_clear_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_train_cli_unreadable_folder_image_names_it(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            (tmp_path / cls / f"{i}.png").write_bytes(b"not a png")
    proc = run_cli("train", "--data", "folder", "--data-dir", tmp_path, "--channels", "1", "--epochs", "1",
                   "--out", tmp_path / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path) in proc.stderr and ".png" in proc.stderr


def test_train_never_replaces_a_run_silently(tmp_path):
    """A second run into a folder that holds one is refused, naming the next free folder and --overwrite;
    --overwrite removes the earlier run's files, its exports included, so nothing stale stays beside the new
    checkpoint (a new run once left the old run's model.onnx and model.int8.verify.json beside its own)."""
    run = tmp_path / "run"
    args = ("train", "lenet5", "--epochs", "1", "--limit", "64", "--out", run)
    run_cli(*args, check=True)
    first = (run / "model.pt").read_bytes()
    (run / "model.onnx").write_bytes(b"an export of the first run")
    (run / "model.int8.verify.json").write_text("{}")
    (tmp_path / "run-2").mkdir()  # taken: the suggestion skips it
    proc = run_cli(*args, "--seed", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{run}/ already holds a run" in proc.stderr and f"--out {run}-3" in proc.stderr
    assert "--overwrite" in proc.stderr and (run / "model.pt").read_bytes() == first
    proc = run_cli(*args, "--seed", "1", "--overwrite", check=True)
    assert "removed the earlier run's" in proc.stdout and (run / "model.pt").read_bytes() != first
    assert not (run / "model.onnx").exists() and not (run / "model.int8.verify.json").exists()
    # resuming continues the run in its own folder
    run_cli("train", "--resume", run / "last.pt", "--epochs", "2", check=True)


def test_a_weak_run_says_so_plainly(tmp_path):
    """One epoch on 20 digits is near chance: the end of `train` says so, with what to try, and metrics.json
    holds the same verdict (a run of 46% on a folder once finished with no word)."""
    proc = run_cli("train", "lenet5", "--epochs", "1", "--limit", "20", "--out", tmp_path / "weak", check=True)
    verdict = json.loads((tmp_path / "weak" / "metrics.json").read_text())["verdict"]
    codes = {f["code"] for f in verdict["findings"]}
    assert verdict["status"] == "weak" and "near_chance" in codes, verdict
    assert "still_improving" in codes  # one epoch: the best was the last
    assert verdict["chance"] == pytest.approx(0.1)
    assert "near chance" in proc.stdout and "try:" in proc.stdout, proc.stdout
    assert "--epochs" in proc.stdout


def test_a_sane_run_says_nothing_alarming(default_run):
    verdict = json.loads((default_run / "metrics.json").read_text())["verdict"]
    assert verdict["status"] == "ok", verdict
    assert not [f for f in verdict["findings"] if f["level"] == "warning"], verdict


def test_verdict_reads_the_validation_curve():
    """Overfitting (training accuracy far above validation) and a run stopped while still improving are
    told apart from a fine run, whatever the test accuracy."""
    from cnnserve.models.verdict import judge

    def history(train_acc, val_acc):
        return [{"epoch": i + 1, "train_accuracy": t, "val_accuracy": v} for i, (t, v) in enumerate(zip(train_acc,
                                                                                                         val_acc))]
    fine = judge(0.95, 100, 4, history([0.6, 0.9, 0.96, 0.97], [0.7, 0.93, 0.95, 0.95]))
    assert fine["status"] == "ok" and not fine["findings"], fine
    over = judge(0.6, 100, 4, history([0.6, 0.9, 1.0, 1.0], [0.5, 0.62, 0.6, 0.6]))
    assert "overfitting" in {f["code"] for f in over["findings"]} and over["status"] == "weak"
    rising = judge(0.8, 100, 4, history([0.4, 0.6, 0.75, 0.85], [0.45, 0.6, 0.72, 0.81]))
    assert "still_improving" in {f["code"] for f in rising["findings"]}
    assert "--epochs" in next(f for f in rising["findings"] if f["code"] == "still_improving")["try"]


def test_resize_whole_keeps_the_whole_picture(tmp_path):
    """--resize whole: the spec says stretch (the whole image to the input size, no centre crop), training
    saw it so, and the export carries it for the service and the scorer."""
    import numpy as np

    from cnnserve.core.preprocess import load_file
    from cnnserve.export.pipeline import export_checkpoint
    from cnnserve.export.store import read_info
    from tests.conftest import encode

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(12):
            picture = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)
            picture[:, :6] = 255 if cls == "a" else 0  # the class shows only at the edge a centre crop drops
            (tmp_path / "photos" / cls / f"{i}.png").write_bytes(encode(picture))
    run = tmp_path / "run"
    run_cli("train", "mobilenet_v1", "--data", "folder", "--data-dir", tmp_path / "photos", "--img-size", 16,
            "--epochs", "1", "--resize", "whole", "--out", run, check=True)
    spec = load_checkpoint(run).get("spec")
    assert spec.resize == "stretch"
    assert load_file(tmp_path / "photos" / "a" / "0.png", spec)[:, :, 0].min() == 255  # the edge is kept
    assert json.loads((run / "metrics.json").read_text())["config"]["resize"] == "whole"
    export_checkpoint(run, log=lambda *a: None)
    assert read_info(run / "model.onnx").spec.resize == "stretch"
