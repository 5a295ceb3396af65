"""Calibrated probabilities at export, an OOD score on every answer, drift on /metrics."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from cnnserve.core.confidence import ood_scores
from cnnserve.core.onnxmeta import ModelInfo
from cnnserve.export import calibrate as cal
from cnnserve.service.answers import psi
from tests.conftest import Server, encode, run_cli


def png(pixels: np.ndarray) -> bytes:
    return encode(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))


def load(path):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess, ModelInfo.from_metadata(sess.get_modelmeta().custom_metadata_map)


# -- the math, on synthetic data whose answer is known -------------------------------------------------

def test_temperature_fit_recovers_the_temperature_labels_were_drawn_at():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (4000, 10))
    p = cal.softmax(logits, 2.5)
    targets = np.array([rng.choice(10, p=row) for row in p])
    t = cal.fit_temperature(logits, targets)
    assert t == pytest.approx(2.5, rel=0.1)
    assert cal.nll(logits, targets, t) <= min(cal.nll(logits, targets, s) for s in (1.0, 2.0, 3.0))
    # calibrated: the ECE of softmax(logits / t) is small, that of the over-confident raw softmax is not
    assert cal.reliability(cal.softmax(logits, t), targets)["ece"] < 0.03 < cal.reliability(cal.softmax(logits), targets)["ece"]


def test_auroc_and_psi_against_their_definitions():
    rng = np.random.default_rng(1)
    inside, outside = rng.normal(0, 1, 60).round(1), rng.normal(1, 1, 50).round(1)  # rounded: ties
    pairs = [(o > i) + 0.5 * (o == i) for i, o in itertools.product(inside, outside)]
    assert cal.auroc(inside, outside) == pytest.approx(np.mean(pairs))
    assert psi([0.25] * 4, [0.25] * 4) == pytest.approx(0.0, abs=1e-9)
    assert psi([0.7, 0.1, 0.1, 0.1], [0.25] * 4) > 0.25


# -- the export -------------------------------------------------------------------------------------

def test_default_export_is_calibrated_and_measured(default_run, digits_test):
    sess, info = load(default_run / "model.onnx")
    t = info.temperature
    assert t > 0 and t != 1.0
    c = info.calibration["test"]
    assert c["bins"] == 15 and c["n"] == len(digits_test[1])
    assert c["after"]["accuracy"] == c["before"]["accuracy"]
    assert c["after"]["ece"] <= 0.015  # the bar set for the default model (15 bins, 360 images)
    # T is the validation split's NLL minimum (test NLL may move either way: it was not fitted there)
    from cnnserve.export.pipeline import test_images
    from cnnserve.models.checkpoint import load_checkpoint

    val_x, val_y = test_images(load_checkpoint(default_run / "model.pt"), split="val")
    (val_logits,) = sess.run(["logits"], {"pixels": val_x})
    assert cal.nll(val_logits, val_y, t) <= min(cal.nll(val_logits, val_y, t * f) for f in (0.9, 1.0 / t, 1.1))
    # the graph: raw logits, probabilities = softmax(logits / T)
    logits, probs = sess.run(["logits", "probabilities"], {"pixels": digits_test[0]})
    np.testing.assert_allclose(probs, cal.softmax(logits, t), atol=1e-5)
    assert (probs.argmax(1) == logits.argmax(1)).all()
    # OOD: the threshold passes ~95% of held-out digits; noise is told apart
    ood = info.ood
    assert set(ood["sets"]) == {"noise", "shapes", "rotated_digits"}
    assert ood["sets"]["noise"]["auroc"] >= 0.95
    assert np.mean(ood_scores(ood, logits, t) <= ood["threshold"]) > 0.85
    report = json.loads((default_run / "model.verify.json").read_text())
    assert report["passed"] and report["probabilities"]["passed"] and report["calibration"]["top1_unchanged"]
    png_path = default_run / "model.reliability.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_inherit_the_temperature_and_no_calibrate_keeps_raw_softmax(default_run, tmp_path, digits_test):
    from cnnserve.export.pipeline import export_checkpoint

    results = export_checkpoint(default_run / "model.pt", tmp_path / "m.onnx", fp16=True, int8=True, calibration=64,
                                calibration_method="minmax", log=lambda *a: None)
    temps = {r["info"].precision: load(r["path"])[1].temperature for r in results}
    assert set(temps) == {"fp32", "fp16", "int8"} and len(set(temps.values())) == 1 and temps["fp32"] != 1.0
    assert all(r["report"]["probabilities"]["passed"] for r in results)
    x = digits_test[0][:64]
    for r in results:
        sess, info = load(r["path"])
        logits, probs = sess.run(["logits", "probabilities"], {"pixels": x})
        assert np.abs(probs - cal.softmax(logits, info.temperature)).max() <= 5e-3
        assert info.ood["threshold"] == pytest.approx(results[0]["info"].ood["threshold"])

    proc = run_cli("export", default_run / "model.pt", "--out", tmp_path / "raw.onnx", "--no-calibrate")
    assert proc.returncode == 0, proc.stderr
    sess, info = load(tmp_path / "raw.onnx")
    assert info.temperature == 1.0 and info.calibration["calibrated"] is False and info.ood["threshold"]
    logits, probs = sess.run(["logits", "probabilities"], {"pixels": x})
    np.testing.assert_allclose(probs, cal.softmax(logits), atol=1e-5)


# -- serving ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(stored_default):
    """A server of this module's own: its drift window holds only these tests' answers."""
    srv = Server("--arg", f"models={stored_default}")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            yield c
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def typical(default_onnx, digits_test) -> np.ndarray:
    """Test digits, most typical first (lowest OOD score): the threshold passes ~95% of digits, so a test
    that needs a digit to pass takes one of these, whatever this run's training made of the others."""
    sess, info = load(default_onnx)
    (logits,) = sess.run(["logits"], {"pixels": digits_test[0]})
    return np.argsort(ood_scores(info.ood, logits, info.temperature))


def noise(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def classify(client, pixels, **params):
    r = client.post("/classify", content=png(pixels), headers={"Content-Type": "image/png"}, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_answers_carry_ood_score_that_flips_for_noise(client, digits_test, default_run, typical):
    x, y = digits_test[0][typical], digits_test[1][typical]
    _, info = load(default_run / "model.onnx")
    digit = classify(client, x[0])
    assert digit["in_distribution"] is True and digit["calibrated"] is True
    assert digit["ood_score"] <= info.ood["threshold"]
    flagged = [classify(client, img) for img in noise(5)]
    assert all(a["in_distribution"] is False and a["ood_score"] > info.ood["threshold"] for a in flagged)
    # the raw softmax on request: same class, as confident as the uncalibrated network (T > 1 softens it)
    raw = classify(client, x[0], calibrated="false")
    assert raw["calibrated"] is False and raw["ood_score"] == digit["ood_score"]
    assert raw["predictions"][0]["index"] == digit["predictions"][0]["index"]
    # an explanation answers as /classify does, and maps the probabilities asked for
    for asked, want in (("true", digit), ("false", raw)):
        r = client.post("/classify/explain", content=png(x[0]), headers={"Content-Type": "image/png"},
                        params={"calibrated": asked})
        assert r.status_code == 200, r.text
        ex = r.json()
        assert (ex["calibrated"], ex["in_distribution"]) == (want["calibrated"], want["in_distribution"])
        assert ex["ood_score"] == pytest.approx(want["ood_score"], abs=1e-3)  # run in another batch size
        assert ex["probability"] == pytest.approx(want["predictions"][0]["probability"], abs=1e-5)
    if info.temperature > 1:
        assert raw["predictions"][0]["probability"] > digit["predictions"][0]["probability"]
    assert client.post("/classify", content=png(x[0]), headers={"Content-Type": "image/png"},
                       params={"calibrated": "maybe"}).status_code == 400
    # batch: per image, bad ones still isolated
    files = [("images", ("a.png", png(x[1]), "image/png")), ("images", ("n.png", png(noise(1)[0]), "image/png")),
             ("images", ("bad.png", b"not an image", "image/png"))]
    results = client.post("/classify/batch", files=files).json()["results"]
    assert results[0]["in_distribution"] is True and results[1]["in_distribution"] is False
    assert "error" in results[2] and "ood_score" not in results[2]
    described = client.get("/models/lenet5-digits").json()
    assert described["temperature"] == info.temperature and described["ood"]["sets"]["noise"]["auroc"] >= 0.95


def monitor(client, until):
    for _ in range(100):  # the drain runs about every second; poll for it, no timing asserted
        body = client.get("/models/lenet5-digits/monitor").json()
        if until(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"monitor never got there: {body}")


def metric(text: str, name: str, **labels) -> float:
    """The largest sample of ``name`` whose labels include ``labels`` (0 when none)."""
    found = [0.0]
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(float(m.group(2)))
    return max(found)


def test_drift_metrics_move_when_the_class_mix_changes(client, digits_test):
    x, y = digits_test
    start = monitor(client, lambda b: True)
    before = client.get("/metrics").text
    zeros = x[y == 0][:20]
    for img in zeros:  # traffic of one class only: far from the test split's mix
        classify(client, img)
    n0 = start["window"]["answers"]
    skewed = monitor(client, lambda b: b["window"]["answers"] >= n0 + 20)
    skewed_psi = skewed["class_psi"]
    text = client.get("/metrics").text
    assert metric(text, "cnnserve_predicted_class_total", model="lenet5-digits", label="0") >= \
        metric(before, "cnnserve_predicted_class_total", model="lenet5-digits", label="0") + 15
    assert metric(text, "cnnserve_top1_probability_count", model="lenet5-digits") >= \
        metric(before, "cnnserve_top1_probability_count", model="lenet5-digits") + 20
    assert "cnnserve_ood_score_bucket" in text and "cnnserve_class_psi" in text
    # then a mix like the test split's: the window's PSI falls
    order = np.random.default_rng(0).permutation(len(y))[:150]
    files = [("images", (f"{i}.png", png(x[i]), "image/png")) for i in order]
    assert client.post("/classify/batch", files=files).status_code == 200
    mixed = monitor(client, lambda b: b["window"]["answers"] >= skewed["window"]["answers"] + 150)
    assert skewed_psi > 0.25 and mixed["class_psi"] < skewed_psi
    assert sum(mixed["reference_classes"].values()) == pytest.approx(1.0, abs=1e-4)
    # the monitor sees what the model ran, whatever the protocol: KServe v2 tensors count too (/metrics
    # sums every worker's answers; the JSON above is the answering worker's)
    before, settled, deadline = client.get("/metrics").text, False, time.monotonic() + 60
    while not settled:  # both workers' drains have run: two reads a drain interval apart agree
        assert time.monotonic() < deadline, "the workers' drift counts never settled"
        time.sleep(1.2)
        now = client.get("/metrics").text
        settled, before = metric(now, "cnnserve_top1_probability_count", model="lenet5-digits") == \
            metric(before, "cnnserve_top1_probability_count", model="lenet5-digits"), now
    sevens = x[y == 7][:30]
    r = client.post("/v2/models/lenet5-digits/infer", json={"inputs": [
        {"name": "pixels", "datatype": "UINT8", "shape": list(sevens.shape), "data": sevens.ravel().tolist()}]})
    assert r.status_code == 200, r.text
    predicted = int((np.reshape(r.json()["outputs"][0]["data"], (30, 10)).argmax(axis=1) == 7).sum())
    for _ in range(100):  # drained about every second
        text = client.get("/metrics").text
        if sum(metric(text, "cnnserve_predicted_class_total", model="lenet5-digits", label=str(c)) for c in range(10)) \
                >= sum(metric(before, "cnnserve_predicted_class_total", model="lenet5-digits", label=str(c))
                       for c in range(10)) + 30:
            break
        time.sleep(0.2)
    assert metric(text, "cnnserve_predicted_class_total", model="lenet5-digits", label="7") == \
        metric(before, "cnnserve_predicted_class_total", model="lenet5-digits", label="7") + predicted


def test_drift_monitor_off(stored_default, digits_test):
    """``drift_monitor=false``: no drift figures (``/monitor`` says why), the answers keep their OOD fields."""
    srv = Server("--arg", f"models={stored_default}", "--arg", "drift_monitor=false", "--arg", "workers=1")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            answer = classify(c, digits_test[0][0])
            assert isinstance(answer["ood_score"], float) and answer["in_distribution"] in (True, False)
            r = c.get("/models/lenet5-digits/monitor")
            assert r.status_code == 404 and r.json()["code"] == "monitor_off"
            time.sleep(1.5)  # a drain interval: nothing would be counted anyway
            assert "cnnserve_top1_probability_count" not in c.get("/metrics").text
    finally:
        srv.stop()


@pytest.mark.parametrize("values", [[0.2, 0.5, 0.95, 1.0, 0.0, -3.0], [1e9, float("inf"), float("nan")], []])
def test_bulk_histogram_observe_is_observe_per_value(values):
    """The drift monitor drains a second of answers in one ``observe_many`` per series: on the locked
    prometheus-client it is the bulk path (its ``observe`` is the one mirrored), and its counts, bucket
    by bucket (bounds themselves included), and its sum are those of ``observe`` per value."""
    from prometheus_client import CollectorRegistry, Histogram

    from cnnserve.service.metrics import bulk_observe_matches, observe_many

    assert bulk_observe_matches()
    registry = CollectorRegistry()
    bulk = Histogram("bulk", "", ["m"], buckets=(0.2, 0.5, 0.9, 1.0), registry=registry)
    each = Histogram("each", "", ["m"], buckets=(0.2, 0.5, 0.9, 1.0), registry=registry)
    observe_many(bulk.labels("x"), values)
    child = each.labels("x")
    for v in values:
        child.observe(v)
    samples = {m.name: [(s.name.split("_", 1)[-1], s.labels.get("le"), s.value) for s in m.samples
                        if not s.name.endswith("_created")] for m in registry.collect()}
    assert len(samples["bulk"]) == len(samples["each"]) == 7
    for (kind, le, a), (_, _, b) in zip(samples["bulk"], samples["each"]):
        assert a == b or (np.isnan(a) and np.isnan(b)), (kind, le, a, b)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_batch_scoring_writes_ood_columns(default_onnx, digits_test, tmp_path, fmt, typical):
    from cnnserve.scoring.run import score
    from cnnserve.scoring.writers import read_predictions

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        (folder / f"digit{i}.png").write_bytes(png(digits_test[0][typical[i]]))
    for i, img in enumerate(noise(3)):
        (folder / f"noise{i}.png").write_bytes(png(img))
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / f"p.{fmt}"
    score([str(folder)], str(out), model=str(default_onnx), top_k=2, progress=False)
    rows = {Path(r["path"]).name: r for r in read_predictions(out)}
    assert all(rows[f"digit{i}.png"]["in_distribution"] is True for i in range(4))
    assert all(rows[f"noise{i}.png"]["in_distribution"] is False for i in range(3))
    assert all(isinstance(rows[f"noise{i}.png"]["ood_score"], float) for i in range(3))
    assert rows["broken.png"]["error"] and rows["broken.png"]["in_distribution"] is None
    if fmt == "csv":
        assert out.read_text().splitlines()[0].endswith("ood_score,in_distribution,error")


def test_calibrate_command_on_a_folder_per_class(default_onnx, digits_test, tmp_path):
    x, y = digits_test
    folder = tmp_path / "labelled"
    for i in range(120):
        (folder / str(y[i])).mkdir(parents=True, exist_ok=True)
        (folder / str(y[i]) / f"{i}.png").write_bytes(png(x[i]))
    proc = run_cli("calibrate", default_onnx, "--images", folder, "--out", tmp_path / "c.onnx")
    assert proc.returncode == 0, proc.stderr
    sess, info = load(tmp_path / "c.onnx")
    assert info.temperature > 0 and info.ood["sets"]["noise"]["auroc"] >= 0.9
    assert info.calibration["test"]["n"] == 60 and "calibrated_on" in info.origin
    logits, probs = sess.run(["logits", "probabilities"], {"pixels": x[:16]})
    np.testing.assert_allclose(probs, cal.softmax(logits, info.temperature), atol=1e-5)
    assert (tmp_path / "c.calibration.json").is_file() and (tmp_path / "c.reliability.png").is_file()
    # a folder that is not one of the model's classes is named, nothing written
    (folder / "cat").mkdir()
    proc = run_cli("calibrate", default_onnx, "--images", folder, "--out", tmp_path / "d.onnx")
    assert proc.returncode != 0 and "cat" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "d.onnx").exists()


def test_harness_calibration_section_reports_the_exports_figures(default_onnx):
    from bench.calibration import report_lines, section

    r = section(str(default_onnx))
    _, info = load(default_onnx)
    assert r["temperature"] == info.temperature and r["bins"] == 15 and r["n_test"] == 360
    assert r["ece_after"] == info.calibration["test"]["after"]["ece"] and r["ood"]["noise"]["auroc"] >= 0.95
    line = report_lines("lenet5", r)[0]
    assert "15 bins, 360 test images" in line and "noise" in line
