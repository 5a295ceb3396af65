"""INT8: quantized variants verified before they are written, stored with their parent, served over
HTTP, and chosen per machine by measurement (``precision=auto``)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from cnnserve.export.files import ExportError
from cnnserve.export.pipeline import export_checkpoint, export_int8
from cnnserve.export.store import read_info, store_model
from cnnserve.core.runtime import ModelLoadError, load_model
from tests.conftest import Server, encode, run_cli


@pytest.fixture(scope="module")
def lenet_int8(default_run, tmp_path_factory):
    """The default model exported again with its int8 variant (into a folder of its own)."""
    out = tmp_path_factory.mktemp("int8") / "lenet5.onnx"
    results = export_checkpoint(default_run, out, int8=True, calibration=64, log=lambda *a: None)
    return results


@pytest.fixture(scope="module")
def resnet_int8(shapes_resnet_run, tmp_path_factory):
    """The session's small ResNet-18 on shapes (32 px), exported with its int8 variant."""
    out = tmp_path_factory.mktemp("int8-resnet") / "resnet18.onnx"
    return export_checkpoint(shapes_resnet_run, out, int8=True, calibration=64, log=lambda *a: None)


@pytest.mark.parametrize("which", ["lenet_int8", "resnet_int8"])
def test_int8_gate_passes_and_report_names_calibration(which, request):
    results = request.getfixturevalue(which)
    assert [r["info"].precision for r in results] == ["fp32", "int8"]
    fp32, int8 = results
    r = int8["report"]
    assert r["passed"] and r["top1_agreement"] >= 0.99, r
    assert abs(r["accuracy_onnxruntime"] - r["accuracy_fp32"]) <= 0.01
    assert r["calibration"]["images"] == 64 and r["calibration"]["method"] in ("minmax", "percentile")
    assert {t["method"] for t in r["calibration"]["tried"]} == {"minmax", "percentile"}
    assert "training split" in r["calibration"]["source"] and r["format"]
    assert "Softmax" in r["ops_in_float"]  # kept in float on purpose; convolutions are not
    assert "Conv" not in r["ops_in_float"]
    assert json.loads(int8["report_path"].read_text())["passed"]
    proto = onnx.load_model(str(int8["path"]))
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) > 0
    assert read_info(int8["path"]).precision == "int8"
    assert int8["path"].name == fp32["path"].stem + ".int8.onnx"


def test_broken_calibration_fails_the_gate_and_writes_no_model(lenet_int8, digits_test, tmp_path):
    """Calibrated on one constant image, the activation ranges are wrong: the gate refuses it, the
    report says why, and no model file appears."""
    fp32 = lenet_int8[0]
    x, y = digits_test
    constant = np.zeros((16, *x.shape[1:]), np.uint8)
    path = tmp_path / "broken.int8.onnx"
    with pytest.raises(ExportError, match="int8 verification failed.*top-1 agreement") as e:
        export_int8(onnx.load_model(str(fp32["path"])), fp32["info"], path, (constant, None), (x[:64], y[:64]),
                    (x, y), method="minmax", log=lambda *a: None)
    assert "no model written" in str(e.value)
    assert not path.exists()
    report = json.loads((tmp_path / "broken.int8.verify.json").read_text())
    assert not report["passed"] and report["calibration"]["images"] == 16


def test_variants_are_stored_with_their_parent(lenet_int8):
    model = store_model(lenet_int8[0]["path"], "lenet5-int8test")
    assert model.info.labels["variants"] == "int8"
    folder = Path(model.path)
    assert (folder / "model.int8.onnx").is_file() and (folder / "model.onnx").is_file()


def test_forcing_a_missing_variant_is_refused(default_onnx):
    with pytest.raises(ModelLoadError, match="no int8 variant.*export it with --int8"):
        load_model(default_onnx, precision="int8", warm_up=False)


def test_a_stale_variant_beside_a_file_is_never_run(default_onnx, resnet_int8, tmp_path):
    """An int8 file left beside a model by an export of other weights is ignored by auto and refused
    when forced (the store refuses to take it at all: test_variants_are_stored_with_their_parent)."""
    import shutil

    shutil.copyfile(default_onnx, tmp_path / "m.onnx")
    shutil.copyfile(resnet_int8[1]["path"], tmp_path / "m.int8.onnx")
    m = load_model(tmp_path / "m.onnx", precision="auto", warm_up=False)
    assert m.choice["candidates"] == ["fp32"] and m.info.precision == "fp32"
    with pytest.raises(ModelLoadError, match="no int8 variant of these weights"):
        load_model(tmp_path / "m.onnx", precision="int8", warm_up=False)


def test_auto_serves_the_variant_its_warm_up_measured_faster(lenet_int8, resnet_int8, monkeypatch):
    """On CPU the candidates are int8 and fp32, each timed at every batch size asked for; the one with the
    lower mean ms per image over those sizes is served (no fixed winner: on a CPU without VNNI fp32 may win).
    Real timings show what is recorded; timings made up for the purpose show the rule: a variant faster at
    one size but slower on the mean loses, and the winner's file is the session that serves."""
    from cnnserve.core import runtime

    for results in (lenet_int8, resnet_int8):
        m = load_model(results[0]["path"], precision="auto", batch_sizes=(1, 16), warm_up=False)
        c = m.choice
        assert c["mode"] == "auto" and c["candidates"] == ["int8", "fp32"]
        assert {p: set(per) for p, per in c["ms_per_image"].items()} == {"int8": {"1", "16"}, "fp32": {"1", "16"}}
        assert all(ms > 0 for per in c["ms_per_image"].values() for ms in per.values())
        by_precision = {r["info"].precision: str(r["path"]) for r in results}
        assert c["chosen"] == m.info.precision and c["file"] == by_precision[c["chosen"]]

    made_up = {"int8": {"1": 0.5, "16": 3.5}, "fp32": {"1": 1.0, "16": 1.0}}  # int8: faster at 1, mean 2.0

    def timed(sessions, shape, batch_sizes, rounds=5):
        assert set(sessions) == {"int8", "fp32"} and list(batch_sizes) == [1, 16]
        return {p: dict(made_up[p]) for p in sessions}

    monkeypatch.setattr(runtime, "time_sessions", timed)
    for int8_at_16, winner in ((3.5, "fp32"), (1.3, "int8")):  # int8's mean 2.0, then 0.9; fp32's 1.0
        made_up["int8"]["16"] = int8_at_16
        m = load_model(lenet_int8[0]["path"], precision="auto", batch_sizes=(16, 1), warm_up=False)
        assert m.choice["chosen"] == winner and m.info.precision == winner, m.choice
        assert m.choice["mean_ms_per_image"] == pytest.approx({"int8": (0.5 + int8_at_16) / 2, "fp32": 1.0})


def test_int8_and_auto_serve_over_http(lenet_int8, resnet_int8, digits_test):
    """Both models stored with their variants; one server forced to int8, one on auto: answers agree
    with fp32 on held-out digits, and /models says which precision runs and why."""
    store_model(lenet_int8[0]["path"], "lenet5-int8http")
    store_model(resnet_int8[0]["path"], "resnet18-int8http")
    x, _ = digits_test
    fp32 = load_model(lenet_int8[0]["path"], warm_up=False)
    want = fp32.predict(x[:20]).argmax(1)
    for precision in ("int8", "auto"):
        srv = Server("--arg", "models=lenet5-int8http:latest resnet18-int8http:latest", "--arg",
                     f"precision={precision}", "--arg", "workers=1")
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as client:
                models = {m["name"]: m for m in client.get("/models").json()["models"]}
                for m in models.values():
                    c = m["precision_choice"]
                    assert c["file"].startswith("model.") and "/" not in c["file"]  # no server paths
                    if precision == "int8":
                        assert m["precision"] == "int8" and c["mode"] == "int8"
                    else:
                        assert c["mode"] == "auto" and m["precision"] == c["chosen"]
                        assert c["chosen"] == min(c["mean_ms_per_image"], key=c["mean_ms_per_image"].get)
                got = [client.post("/classify", content=encode(img[0]), params={"model": "lenet5-int8http"},
                                   headers={"Content-Type": "image/png"}).json()["predictions"][0]["index"]
                       for img in x[:20]]
                assert np.mean(np.array(got) == want) >= 0.95
                r = client.post("/classify", content=encode(np.zeros((32, 32, 3), np.uint8)),
                                params={"model": "resnet18-int8http"}, headers={"Content-Type": "image/png"})
                assert r.status_code == 200, r.text
        finally:
            srv.stop()
        log = srv.output()
        assert "in int8 on CPUExecutionProvider" in log or precision == "auto"
        assert precision == "int8" or "precision auto on CPUExecutionProvider chose" in log


def test_quantize_command_for_any_model_with_a_folder(default_onnx, digits_test, tmp_path):
    """`cnnserve quantize` (what an imported model uses): calibrated on a folder, verified on the rest,
    a bad folder is a one-line error naming it."""
    import shutil

    x, _ = digits_test
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(x[:120]):
        (folder / f"{i:03d}.png").write_bytes(encode(img[0]))
    model = tmp_path / "m.onnx"
    shutil.copyfile(default_onnx, model)
    proc = run_cli("quantize", model, "--images", folder, "--calibration", "64", "--no-store")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.int8.onnx").is_file()
    report = json.loads((tmp_path / "m.int8.verify.json").read_text())
    assert report["passed"] and report["n_images"] == 56 and report["calibration"]["source"].startswith("folder")
    proc = run_cli("quantize", model, "--images", tmp_path / "nowhere", "--no-store")
    assert proc.returncode != 0 and "nowhere: no readable images" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_batch_scoring_takes_the_same_choice(lenet_int8, digits_test, tmp_path):
    """`cnnserve score --precision`: int8 scores with the int8 file and agrees with fp32; a model without
    the variant is a one-line error naming it."""
    x, _ = digits_test
    folder = tmp_path / "in"
    folder.mkdir()
    for i, img in enumerate(x[:40]):
        (folder / f"{i:02d}.png").write_bytes(encode(img[0]))
    rows = {}
    for precision in ("fp32", "int8"):
        proc = run_cli("score", folder, "--model", lenet_int8[0]["path"], "--precision", precision,
                       "--out", tmp_path / f"{precision}.jsonl")
        assert proc.returncode == 0, proc.stderr
        assert f"({precision}, {precision} precision)" in proc.stderr
        rows[precision] = [json.loads(line) for line in (tmp_path / f"{precision}.jsonl").read_text().splitlines()]
    top = {p: [r["indices"][0] for r in sorted(rs, key=lambda r: r["path"])] for p, rs in rows.items()}
    assert len(top["int8"]) == 40
    assert np.mean(np.array(top["int8"]) == np.array(top["fp32"])) >= 0.95
    proc = run_cli("score", folder, "--model", tmp_path / "none.onnx", "--precision", "int8", "--out", tmp_path / "x.csv")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_quantize_an_imported_model(shapes_resnet_run, tmp_path):
    """An ONNX classifier made elsewhere (here: the session's small ResNet exported by plain torch, float
    input, normalisation left out), `cnnserve import`ed, then `cnnserve quantize`d on a folder. The
    importer once listed the default opset three times, which onnxruntime's quantizer refuses ("Failed to
    find proper ai.onnx domain")."""
    import torch

    from cnnserve.models.checkpoint import classifier_from_checkpoint, load_checkpoint
    from cnnserve.models.data import load_dataset, save_png

    model = classifier_from_checkpoint(load_checkpoint(shapes_resnet_run)).eval()
    spec = model.spec
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(model.net, (torch.randn(2, 3, spec.height, spec.width),), str(foreign), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)
    (tmp_path / "labels.txt").write_text("\n".join(spec.labels) + "\n")
    imported = tmp_path / "imported" / "model.onnx"
    proc = run_cli("import", foreign, "--mean", *spec.mean, "--std", *spec.std, "--labels", tmp_path / "labels.txt",
                   "--resize", spec.resize, "--crop-pct", spec.crop_pct, "--interpolation", spec.interpolation,
                   "--out", imported, "--no-store")
    assert proc.returncode == 0, proc.stderr
    domains = [o.domain or "ai.onnx" for o in onnx.load_model(str(imported)).opset_import]
    assert len(domains) == len(set(domains)), domains
    # a folder as a user has one: 64 training images to calibrate on (sorted first), then the held-out ones
    folder = tmp_path / "photos"
    folder.mkdir()
    splits = load_dataset("shapes", spec)
    for prefix, split, n in (("a", splits.train, 64), ("b", splits.test, len(splits.test))):
        for i in range(n):
            (folder / f"{prefix}{i:03d}.png").write_bytes(save_png(split[i][0].numpy()))
    proc = run_cli("quantize", imported, "--images", folder, "--calibration", "64", "--no-store")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((imported.parent / "model.int8.verify.json").read_text())
    assert report["passed"] and report["n_images"] == 256  # --check's default
    assert read_info(imported.parent / "model.int8.onnx").precision == "int8"


def test_export_int8_store_keeps_the_verified_fp32(default_run, tmp_path):
    """`export --int8 --store` where the int8 variant fails its gate: the verified fp32 model is still
    written and stored, the command exits 1 and says what was kept; without --store it says how to store
    it (once nothing was stored, and the message did not say that `cnnserve store` would). The gate
    fails for real: the checkpoint's folder data set is given again with --data-dir, its training images
    (which int8 calibrates on) replaced by blank ones and its test images kept."""
    from cnnserve.models.checkpoint import load_checkpoint
    from cnnserve.models.data import load_dataset, save_png

    splits = load_dataset("digits", load_checkpoint(default_run)["spec"])
    for root, blank in (("good", False), ("broken", True)):
        for split, images in (("train", splits.train), ("test", splits.test)):
            for i in range(len(images)):
                x, y = images[i]
                folder = tmp_path / root / split / str(int(y))
                folder.mkdir(parents=True, exist_ok=True)
                pixels = np.zeros_like(x.numpy()) if blank and split == "train" else x.numpy()
                (folder / f"{i:04d}.png").write_bytes(save_png(pixels))
    run = tmp_path / "run"
    run_cli("train", "lenet5", "--data", "folder", "--data-dir", tmp_path / "good", "--channels", "1",
            "--epochs", "4", "--out", run, check=True)
    export = ("export", run / "model.pt", "--data-dir", tmp_path / "broken", "--int8", "--calibration", "64")
    proc = run_cli(*export, "--store", "--name", "partial-int8")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "model.int8.onnx: int8 verification failed" in proc.stderr and "Traceback" not in proc.stderr
    assert "stored what passed (fp32) as partial-int8:" in proc.stderr
    assert (run / "model.onnx").is_file() and not (run / "model.int8.onnx").exists()
    import bentoml

    stored = bentoml.models.get("partial-int8:latest")
    assert stored.info.labels["variants"] == "none" and stored.info.labels["precision"] == "fp32"
    proc = run_cli(*export)
    assert proc.returncode == 1 and f"`cnnserve store {run / 'model.onnx'}` stores it" in proc.stderr, proc.stderr
