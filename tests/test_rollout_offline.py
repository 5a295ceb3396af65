"""The offline half of a rollout on real files: the traffic capture's writer (its format, rotation, byte budget,
bounded queue that drops and counts rather than waits), `cnnserve score` on a capture, `cnnserve evaluate`
against a hand-checked case, and `cnnserve replay` of a capture against itself and another version."""

from __future__ import annotations

import csv
import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve.service.capture import Capture
from tests.conftest import encode, run_cli

NAME = "lenet5-digits"
SWAPPED = ("3", "8")  # the second version's metadata names these two classes the other way round


def counter(result: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("cnnserve_capture_samples_total", {"result": result}) or 0.0


def answer(top: list[dict], fields: dict, version: str) -> dict:
    return {"model": NAME, "version": version, "predictions": top, **fields}


@pytest.fixture(scope="module")
def model(default_onnx):
    from cnnserve.core.runtime import load_model

    return load_model(default_onnx, warm_up=False)


@pytest.fixture(scope="module")
def answered(model, digits_test):
    """Held-out digits the default model gets right, 4 of each class: (PNG bytes, true label, the service's
    answer fields for it: top-5, ood_score, in_distribution, calibrated)."""
    from cnnserve.core.confidence import score_rows

    x, y = digits_test
    probs, fields = score_rows(model, x)
    tops = model.top_k(probs, 5)
    chosen, per_class = [], {}
    for i in range(len(y)):
        label = model.spec.labels[y[i]]
        if tops[i][0]["label"] == label and per_class.get(label, 0) < 4:
            per_class[label] = per_class.get(label, 0) + 1
            chosen.append((encode(x[i][0]), label, {"predictions": tops[i], **fields[i]}))
    assert len(chosen) == 40
    return chosen


@pytest.fixture(scope="module")
def versions(default_onnx, stored_default, tmp_path_factory):
    """The default model stored twice under one name: v1 as exported, v2 the same graph whose metadata swaps
    the labels 3 and 8 (so exactly the images answered 3 or 8 change their answer)."""
    import onnx

    from cnnserve.core.onnxmeta import KEY_LABELS
    from cnnserve.export.store import store_model
    from tests.support.hostile import _set_meta

    folder = tmp_path_factory.mktemp("swapped")
    m = onnx.load(str(default_onnx))
    labels = json.loads(next(p.value for p in m.metadata_props if p.key == KEY_LABELS))
    a, b = labels.index(SWAPPED[0]), labels.index(SWAPPED[1])
    labels[a], labels[b] = labels[b], labels[a]
    _set_meta(m, labels=labels)
    onnx.save(m, str(folder / "model.onnx"))
    v1 = store_model(default_onnx, name=NAME).tag.version
    v2 = store_model(folder / "model.onnx", name=NAME).tag.version
    return {"v1": v1, "v2": v2}


def capture_of(folder: Path, answered, version: str, **kw) -> Capture:
    cap = Capture(folder, rate=1.0, **kw)
    for i, (data, _, fields) in enumerate(answered):
        assert cap.offer(f"req-{i:03d}", NAME, version, data, "image/png", answer(fields["predictions"],
                         {k: v for k, v in fields.items() if k != "predictions"}, version), 2.5)
    return cap


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("manifest-*.jsonl"), key=lambda p: int(p.stem[9:]))
            for line in p.read_text().splitlines()]


# --- the capture's writer ------------------------------------------------------------------------------------

def test_capture_writes_each_image_as_received_and_rotates_its_manifests(tmp_path, answered):
    jpeg = encode(np.full((20, 20), 200, np.uint8), "JPEG")
    cap = capture_of(tmp_path, answered[:7], "v1", manifest_rows=3)
    assert cap.offer("../../etc/passwd x", NAME, "v1", jpeg, "application/octet-stream", {}, 1.0)
    assert cap.offer("req-000", NAME, "v1", answered[0][0], "image/png", {}, 1.0)  # a repeated request id
    assert cap.close() == {"written": 9, "dropped": 0, "failed": 0, "evicted": 0}

    assert sorted(p.name for p in tmp_path.glob("manifest-*.jsonl")) == [f"manifest-{n}.jsonl" for n in range(3)]
    rows = rows_of(tmp_path)
    assert [len(p.read_text().splitlines()) for p in sorted(tmp_path.glob("manifest-*.jsonl"))] == [3, 3, 3]
    assert [r["id"] for r in rows[:7]] == [f"req-{i:03d}" for i in range(7)]
    for row, (data, _, fields) in zip(rows[:7], answered):
        assert (tmp_path / row["path"]).read_bytes() == data
        assert row["labels"] == [p["label"] for p in fields["predictions"]]
        assert row["probabilities"] == [p["probability"] for p in fields["predictions"]]
        assert (row["model"], row["version"], row["ood_score"], row["latency_ms"]) == (NAME, "v1",
                                                                                        fields["ood_score"], 2.5)
        assert row["time"].endswith("Z") and row["bytes"] == len(data)
    # a hostile id stays a file name inside images/; the extension is the bytes' own, not the content type's
    assert rows[7]["path"] == "images/_.._etc_passwd_x.jpg" and (tmp_path / rows[7]["path"]).read_bytes() == jpeg
    assert rows[7]["id"] == "../../etc/passwd x"
    assert rows[8]["path"] == "images/req-000-1.png"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(r["path"][7:] for r in rows)


def test_capture_offer_never_waits_on_the_disk_and_counts_what_a_full_queue_drops(tmp_path, answered):
    """The writer blocks on an Event inside its write: offers still return, the queue holds exactly its bound
    (the sample being written counts), every other sample is dropped and counted on the metric."""
    release, writing = threading.Event(), threading.Event()

    class Stuck(Capture):
        def _write(self, sample):
            writing.set()
            release.wait()
            super()._write(sample)

    before = counter("dropped")
    cap = Stuck(tmp_path, rate=1.0, queue=4)
    results = []
    offers = threading.Thread(target=lambda: results.extend(
        cap.offer(f"r{i}", NAME, "v1", answered[i % 40][0], "image/png", {}, 1.0) for i in range(50)))
    offers.start()
    offers.join(60)
    stuck = offers.is_alive()
    started = writing.wait(30)  # the writer took the first sample and is stuck in its write
    release.set()  # whatever the outcome, let the writer go
    assert not stuck, "offer waited for the writer"
    assert started and results.count(True) == 4 and results.count(False) == 46
    assert counter("dropped") - before == 46
    assert cap.close() == {"written": 4, "dropped": 46, "failed": 0, "evicted": 0}
    assert len(rows_of(tmp_path)) == 4 == len(list((tmp_path / "images").iterdir()))


def test_capture_samples_at_its_rate(tmp_path, answered):
    release = threading.Event()

    class Stuck(Capture):
        def _write(self, sample):
            release.wait()

    random.seed(7)
    cap = Stuck(tmp_path, rate=0.25, queue=10_000)
    taken = sum(cap.offer("r", NAME, "v1", b"x", "image/png", {}, 1.0) for _ in range(4000))
    none = Stuck(tmp_path / "off", rate=0.0)
    assert not any(none.offer("r", NAME, "v1", b"x", "image/png", {}, 1.0) for _ in range(100))
    release.set()
    cap.close(), none.close()
    assert 850 < taken < 1150  # 1,000 expected; binomial sd 27


def test_capture_keeps_its_folder_within_the_byte_budget_oldest_first(tmp_path):
    rng = np.random.default_rng(0)
    noise = [encode(rng.integers(0, 256, (48, 48), np.uint8)) for _ in range(80)]  # ~2.4 KB each
    budget_mb = 0.05
    cap = Capture(tmp_path, rate=1.0, max_mb=budget_mb, manifest_rows=10)
    for i, data in enumerate(noise):
        assert cap.offer(f"img-{i:03d}", NAME, "v1", data, "image/png", {}, 1.0)
    counts = cap.close()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= budget_mb * 2**20
    kept = sorted(p.stem for p in (tmp_path / "images").iterdir())
    assert counts["evicted"] > 0 and 5 < len(kept) < 80
    assert kept == [f"img-{i:03d}" for i in range(80 - len(kept), 80)], "the newest images stay"
    # rows of removed images stay while their manifest does; the newest manifest is there
    assert (tmp_path / "manifest-7.jsonl").is_file()
    assert {r["id"] for r in rows_of(tmp_path)} >= set(kept)


def test_capture_refuses_settings_that_cannot_work(tmp_path):
    for bad in ({"rate": 1.5}, {"rate": -0.1}, {"max_mb": 0}, {"queue": 0}):
        with pytest.raises(ValueError, match="capture_"):
            Capture(tmp_path, **bad)


# --- a capture as scoring's input ----------------------------------------------------------------------------

def test_score_takes_a_capture_folder_and_its_manifests(tmp_path, answered, default_onnx):
    folder = tmp_path / "capture"
    capture_of(folder, answered[:12], "v1", manifest_rows=5).close()
    (folder / "labels.jsonl").write_text('{"id": "req-000", "label": "0"}\n')
    whole = tmp_path / "whole.csv"
    run_cli("score", folder, "--model", default_onnx, "--out", whole, check=True)
    listed = tmp_path / "listed.jsonl"
    run_cli("score", *sorted(folder.glob("manifest-*.jsonl")), "--model", default_onnx, "--out", listed, check=True)
    with whole.open() as f:
        by_folder = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    by_manifest = [json.loads(line) for line in listed.read_text().splitlines()]
    assert len(by_folder) == 12 and not any(r["error"] for r in by_folder.values())
    # the manifests list the images in the order they were answered, and the answers agree with the capture's
    assert [Path(r["path"]).name for r in by_manifest] == [f"req-{i:03d}.png" for i in range(12)]
    for r, (_, _, fields) in zip(by_manifest, answered):
        assert r["labels"][0] == fields["predictions"][0]["label"] == by_folder[Path(r["path"]).name]["label_1"]


# --- evaluate ------------------------------------------------------------------------------------------------

MOVED = [("1", "7"), ("1", "7"), ("2", "7"), ("3", "5")]  # (true class, folder it is planted in)


@pytest.fixture(scope="module")
def evaluation_set(tmp_path_factory, answered):
    """The 40 correctly answered digits in class folders, 4 of them planted in the wrong class's folder, and
    one image at the top without a label; and each file's true class."""
    root = tmp_path_factory.mktemp("labelled")
    moves, truth = {}, {}
    for src, dst in MOVED:
        moves.setdefault(src, []).append(dst)
    for i, (data, label, _) in enumerate(answered):
        folder = moves[label].pop() if moves.get(label) else label
        (root / folder).mkdir(exist_ok=True)
        (root / folder / f"{i:03d}.png").write_bytes(data)
        truth[f"{folder}/{i:03d}.png"] = label
    (root / "loose.png").write_bytes(answered[0][0])
    return root, truth


def test_evaluate_reports_the_hand_checked_figures(evaluation_set, default_onnx, model, tmp_path):
    from cnnserve.export.calibrate import reliability

    evaluation_set, _ = evaluation_set
    out = tmp_path / "report"
    proc = run_cli("evaluate", default_onnx, evaluation_set, "--out", out, "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    assert "accuracy 90.00%" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    f = report["figures"]
    assert (f["images"], f["accuracy"], f["top_k_accuracy"], report["unlabelled"]) == (40, 0.9, 0.9, 1)
    recall = {c["label"]: c["recall"] for c in f["per_class"]}
    support = {c["label"]: c["support"] for c in f["per_class"]}
    # "7" holds its own 4 and 3 planted ones; "1" lost 2, "2" and "3" one each; "5" holds 4 and 1 planted
    assert (support["7"], recall["7"]) == (7, round(4 / 7, 6))
    assert (support["1"], recall["1"]) == (2, 1.0) and (support["5"], recall["5"]) == (5, 0.8)
    assert all(recall[c] == 1.0 for c in "0234689")
    labels = list(model.spec.labels)
    m = np.array(f["confusion"])
    assert m[labels.index("7"), labels.index("1")] == 2 and m[labels.index("7"), labels.index("2")] == 1
    assert m[labels.index("5"), labels.index("3")] == 1 and m.sum() == 40 and np.trace(m) == 36
    # ECE as export measures it, on the probabilities of the same files
    from cnnserve.core.preprocess import load_file

    files = sorted(p for p in evaluation_set.rglob("*.png") if p.parent != evaluation_set)
    probs = model.predict(np.stack([load_file(p, model.spec) for p in files])).astype(np.float64)
    targets = np.array([labels.index(p.parent.name) for p in files])
    assert f["ece"] == pytest.approx(reliability(probs, targets)["ece"], abs=1e-6)
    assert 0 < f["ece"]  # the planted labels are confident mistakes
    for png in ("confusion.png", "reliability.png"):
        assert Image.open(out / png).size[0] > 200
    assert "| accuracy (top-1) | 90.00% |" in (out / "report.md").read_text()
    assert len(report["mistakes"]) == 4

    gate = run_cli("evaluate", default_onnx, evaluation_set, "--out", out, "--min-accuracy", "0.95")
    assert gate.returncode == 1 and "under --min-accuracy" in gate.stderr


def test_evaluate_takes_labels_from_a_file(evaluation_set, default_onnx, tmp_path):
    """--labels: a CSV of paths relative to the folder and their true classes (the planted ones' too)."""
    root, truth = evaluation_set
    labels = tmp_path / "labels.csv"
    labels.write_text("path,truth\n" + "".join(f"{k},{v}\n" for k, v in truth.items()))
    out = tmp_path / "report"
    run_cli("evaluate", default_onnx, root, "--labels", labels, "--label-column", "truth", "--out", out, check=True)
    report = json.loads((out / "report.json").read_text())
    assert (report["figures"]["images"], report["figures"]["accuracy"], report["unlabelled"]) == (40, 1.0, 0)


def test_evaluate_names_what_is_wrong(tmp_path, default_onnx, answered):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(answered[0][0])
    proc = run_cli("evaluate", default_onnx, tmp_path / "flat")
    assert proc.returncode == 2 and "no labelled images" in proc.stderr and "Traceback" not in proc.stderr
    for name in ("7", "seven"):
        (tmp_path / "named" / name).mkdir(parents=True)
        (tmp_path / "named" / name / "a.png").write_bytes(answered[0][0])
    proc = run_cli("evaluate", default_onnx, tmp_path / "named")
    assert proc.returncode == 2 and "'seven'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("evaluate", default_onnx, tmp_path / "nowhere")
    assert proc.returncode == 2 and "no such folder" in proc.stderr


# --- replay --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def capture(tmp_path_factory, answered, versions):
    """The 40 digits as v1 answered them, captured by the writer; feedback labels for the first 20; one image
    removed, as the byte budget would."""
    folder = tmp_path_factory.mktemp("capture")
    capture_of(folder, answered, versions["v1"], manifest_rows=16).close()
    with (folder / "labels.jsonl").open("w") as f:
        for i, (_, label, _) in enumerate(answered[:20]):
            f.write(json.dumps({"id": f"req-{i:03d}", "label": label}) + "\n")
    (folder / "images" / "req-039.png").unlink()
    return folder


def test_replay_of_the_served_version_agrees_with_its_recorded_answers(capture, versions, tmp_path):
    proc = run_cli("replay", capture, "--model", f"{NAME}:{versions['v1']}", "--out", tmp_path,
                   "--min-agreement", "1")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["comparison"] == {"images": 39, "disagreements": 0, "agreement": 1.0, "mean_abs_delta_p": 0.0}
    assert report["skipped"]["image_gone"] == 1
    assert report["accuracy"] == {"labelled": 20, "candidate": 1.0, "baseline": 1.0}
    assert not (tmp_path / "disagreements.png").exists()


@pytest.mark.parametrize("against", [False, True], ids=["recorded", "against-v1"])
def test_replay_of_another_version_finds_exactly_the_changed_answers(capture, versions, answered, tmp_path, against):
    proc = run_cli("replay", capture, "--model", f"{NAME}:{versions['v2']}", "--out", tmp_path,
                   *(("--against", f"{NAME}:{versions['v1']}") if against else ()), "--min-agreement", "0.9")
    changed = [f"req-{i:03d}" for i, (_, label, _) in enumerate(answered[:39]) if label in SWAPPED]
    assert proc.returncode == 1 and "under --min-agreement" in proc.stderr  # 31 of 39 agree
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["comparison"]["disagreements"] == len(changed) == 8
    assert report["comparison"]["agreement"] == round(1 - 8 / 39, 6)
    assert sorted(d["id"] for d in report["disagreements"]) == changed
    for d in report["disagreements"]:
        assert {d["baseline"], d["candidate"]} == set(SWAPPED)
    # the candidate gives the baseline's class what the baseline gave the other one: the deltas are real
    assert report["comparison"]["mean_abs_delta_p"] > 0.05
    # feedback for the first 20: those of them that are a 3 or an 8 are answered the other way now
    wrong = sum(label in SWAPPED for _, label, _ in answered[:20])
    assert wrong > 0 and report["accuracy"] == {"labelled": 20, "candidate": 1 - wrong / 20, "baseline": 1.0}
    sheet = Image.open(tmp_path / "disagreements.png")
    assert sheet.size[0] > 500 and len(sheet.getcolors(1 << 20) or []) > 10
    assert "disagreements.png" in (tmp_path / "report.md").read_text()


def test_replay_names_what_is_wrong(tmp_path, capture, versions, default_onnx):
    proc = run_cli("replay", tmp_path, "--model", default_onnx)
    assert proc.returncode == 2 and "not a capture" in proc.stderr
    proc = run_cli("replay", capture, "--model", default_onnx, "--of", "resnet18-shapes")
    assert proc.returncode == 2 and "resnet18-shapes" in proc.stderr and NAME in proc.stderr
    proc = run_cli("replay", capture, "--model", f"{NAME}:nosuchversion")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_a_busy_worker_shadows_only_within_its_share_of_time(tmp_path):
    """``Rollout._room`` on real batchers: an idle primary lends its time to the shadow; a busy one only
    ``shadow_share`` of it, each run charged the candidate's measured seconds per image; the candidate never
    holds more than ``shadow_queue`` images."""
    import asyncio
    import time

    from cnnserve.core.config import Settings
    from cnnserve.service.batching import MicroBatcher
    from cnnserve.service.rollout import Rollout

    release = threading.Event()

    def held(batch):
        release.wait(10)
        return np.zeros((len(batch), 2), np.float32)

    rollout = Rollout(None, tmp_path, Settings(shadow_share=0.05, shadow_queue=16))
    primary = MicroBatcher(held, 8, 64, 0, name="primary")
    cand = MicroBatcher(held, 8, 64, 0, name="candidate", seconds_per_image=0.01)

    async def check():
        assert rollout._room(primary, cand, 1)  # nothing else to do: the shadow runs
        assert not rollout._room(primary, cand, 17)  # more than shadow_queue images
        busy = asyncio.ensure_future(primary.submit(np.zeros((1, 1, 2, 2), np.uint8)))
        while not primary._running:
            await asyncio.sleep(0.001)
        rollout.credit, rollout.credit_at = 0.0, time.monotonic()
        assert not rollout._room(primary, cand, 1)  # busy, and no time saved up
        rollout.credit_at -= 1.1  # 1.1 s busy at a 5% share: 55 ms, five runs of 10 ms
        ran = [rollout._room(primary, cand, 1) for _ in range(8)]
        release.set()
        await busy
        return ran

    try:
        assert asyncio.run(check()) == [True] * 5 + [False] * 3
    finally:
        release.set()
        primary.close(), cand.close()
        rollout.close()


def test_the_shadow_share_holds_over_any_history(tmp_path, monkeypatch):
    """``Rollout._room`` searched with hypothesis (a stateful test on real batchers, the rule's clock stepped by the
    test): whatever the order of busy and idle spells, waits, measured costs per image and shadow sizes,
    - the shadow work granted while the primary is busy, over any stretch of time, is at most the share of that
      stretch plus the most a worker saves (``CREDIT_S``): a busy worker never gives more;
    - a busy worker refuses a run only when the share of the time since its last busy grant (at most ``CREDIT_S``)
      does not cover the run's cost: it never starves the shadow of the share it has;
    - an idle primary always lends its time, and ``shadow_queue`` always bounds the candidate's images."""
    from types import SimpleNamespace

    from hypothesis import settings as hsettings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

    from cnnserve.core.config import Settings
    from cnnserve.service import rollout as rollout_module
    from cnnserve.service.batching import MicroBatcher
    from cnnserve.service.rollout import CREDIT_S, RUN_COST_S, Rollout

    clock = SimpleNamespace(now=1000.0)
    real_time = rollout_module.time
    monkeypatch.setattr(rollout_module, "time", SimpleNamespace(
        monotonic=lambda: clock.now, time=real_time.time, perf_counter=real_time.perf_counter))
    eps = 1e-9
    folders = iter(range(10**6))

    class ShadowShare(RuleBasedStateMachine):
        @initialize(share=st.sampled_from([0.0, 0.01, 0.05, 0.5, 1.0]), queue=st.integers(1, 32))
        def start(self, share, queue):
            folder = tmp_path / str(next(folders))
            folder.mkdir()
            self.share, self.queue = share, queue
            self.rollout = Rollout(None, folder, Settings(shadow_share=share, shadow_queue=queue))
            self.primary = MicroBatcher(lambda b: b, 8, 64, 0, name="primary")
            self.cand = MicroBatcher(lambda b: b, 8, 64, 0, name="candidate")
            self.started = clock.now
            self.grants: list[tuple[float, float]] = []  # (when, cost) of each run granted while busy
            self.last = clock.now  # the last busy grant, or the start

        def teardown(self):
            if hasattr(self, "rollout"):
                self.primary.close(), self.cand.close()
                self.rollout.close()

        @rule(seconds=st.one_of(st.floats(0, 0.01), st.floats(0, 3)))
        def wait(self, seconds):
            clock.now += seconds

        @rule(queued=st.integers(0, 3), running=st.integers(0, 3))
        def primary_has(self, queued, running):
            self.primary._queued, self.primary._running = queued, running

        @rule(per_image=st.one_of(st.sampled_from([0.0, 1e-4, 1e-3, 0.01, 0.05]), st.floats(0, 0.3)),
              held=st.one_of(st.just(0), st.integers(0, 40)))
        def candidate_is(self, per_image, held):
            self.cand._per_image, self.cand._queued = per_image, held

        @rule(n=st.one_of(st.integers(1, 4), st.integers(1, 40)), times=st.integers(1, 30),
              apart=st.sampled_from([0.0, 1e-3, 0.02]))
        def ask(self, n, times, apart):
            for _ in range(times):  # a burst of requests, each shadowed
                self.ask_once(n)
                clock.now += apart

        def ask_once(self, n):
            busy = bool(self.primary._queued or self.primary._running)
            granted = self.rollout._room(self.primary, self.cand, n)
            cost = max(self.cand._per_image * n, RUN_COST_S)
            if self.cand._queued + n > self.queue:
                assert not granted, f"{n} more images over shadow_queue {self.queue} ({self.cand._queued} held)"
                return
            if not busy:
                assert granted, "an idle primary refused the shadow"
                return
            if granted:
                self.grants.append((clock.now, cost))
                self.last = clock.now
            else:
                saved = min(CREDIT_S, self.share * (clock.now - self.last))
                assert cost > saved - eps, f"refused a run of {cost:.4f} s with {saved:.4f} s saved"

        @invariant()
        def within_the_share(self):
            if not hasattr(self, "rollout"):
                return
            for since in [self.started, *(t for t, _ in self.grants)]:
                given = sum(c for t, c in self.grants if t >= since)
                allowed = CREDIT_S + self.share * (clock.now - since)
                assert given <= allowed + eps, f"{given:.4f} s of shadow work since {since - self.started:.3f} s, " \
                                               f"allowed {allowed:.4f}"

    run_state_machine_as_test(ShadowShare, settings=hsettings(max_examples=150, stateful_step_count=30,
                                                               deadline=None, derandomize=True, database=None))


def test_the_ring_is_trimmed_through_an_index(tmp_path):
    """Each flush trims every model's rows to its newest ``feedback_ring`` through the (model, seq) index, never by
    sorting the model's rows (which grew with the ring: 60 ms of CPU per flush at 100,000); and trims exactly."""
    import sqlite3

    from cnnserve.service.rollout import SCHEMA, TRIM, Store

    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)
    for table in ("answers", "labels", "shadows"):
        plan = " | ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + TRIM.format(table=table), ("m", "m", 5)))
        assert "TEMP B-TREE" not in plan and f"{table}_by_age" in plan, (table, plan)
    store = Store(tmp_path / "r.sqlite", 7)
    try:
        for flush in range(3):
            store.write([(m, f"{m}{flush}-{i}", 0, "v", i, 0.0) for m in ("a", "b") for i in range(5)], [], {})
        kept = store.db.execute("SELECT model, id FROM answers ORDER BY seq").fetchall()
        assert [i for m, i in kept if m == "a"] == ["a1-3", "a1-4"] + [f"a2-{i}" for i in range(5)], kept
        assert len(kept) == 14
    finally:
        store.close()


def test_evaluate_on_the_test_split_gives_the_accuracy_training_reported(default_run, default_onnx, digits_test,
                                                                          tmp_path):
    """The held-out digits written as PNG files in class folders (lossless: the pixels training tested on): the
    command's accuracy is the one training wrote to metrics.json, to the image."""
    x, y = digits_test
    labels = json.loads((default_run / "metrics.json").read_text())["spec"]["labels"]
    root = tmp_path / "test-split"
    for i, (image, label) in enumerate(zip(x, y)):
        (root / labels[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(root / labels[label] / f"{i:04d}.png")
    out = tmp_path / "report"
    run_cli("evaluate", default_onnx, root, "--out", out, check=True)
    trained = json.loads((default_run / "metrics.json").read_text())["test"]
    f = json.loads((out / "report.json").read_text())["figures"]
    assert f["images"] == trained["n_test"] == len(y)
    assert f["accuracy"] == pytest.approx(trained["test_accuracy"], abs=1e-6), (f["accuracy"], trained)
