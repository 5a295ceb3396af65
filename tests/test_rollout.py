"""Rollout on live traffic against one real two-worker server: feedback joined on request ids whichever worker
answered, the canary's share and stickiness, promote refusing then passing, rollback, and a shadow's agreement with
a copy of the served file and with a model that answers differently; then hypothesis drives the same server
through loads, canaries, shadows, promotes, rollbacks and feedback, checking the invariants of docs/rollout.md.

Each test uses a model name of its own (copies of the default model stored under it), so the figures of one
(kept per model) are not another's."""

from __future__ import annotations

import collections
import json
import os
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import Server, encode, run_cli

pytestmark = pytest.mark.slow
TOKEN = "test-token-rollout"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RING = 40  # feedback_ring: the answers (and labels, and shadow runs) kept per model
SHADOW_QUEUE = 4  # shadow_queue: one client at a time never fills it, 64 at once do
STEPS: collections.Counter = collections.Counter()  # what the state machine did, for its summary and its floor
NAMES = ("ro-feedback", "ro-canary", "ro-promote", "ro-shadow", "ro-states")


def swapped(src: Path, dst: Path) -> Path:
    """The model with two classes' output rows exchanged: it answers 5 where the original answers 3, and so on
    (a retrained model that differs on some inputs)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    done = 0
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.shape[:1] == (10,) and a.ndim in (1, 2) and done < 2 and init.name in _last_layer(m):
            a = a.copy()
            a[[3, 5]] = a[[5, 3]]
            init.CopyFrom(numpy_helper.from_array(a, init.name))
            done += 1
    assert done == 2, "no final layer of 10 outputs found"
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    return dst


def _last_layer(m) -> set[str]:
    gemms = [n for n in m.graph.node if n.op_type in ("Gemm", "MatMul", "Add")]
    return {i for n in gemms[-2:] for i in n.input}


def store_versions(default_onnx, folder, names) -> dict:
    """Per model name: v1 (the default model), v2 (the same file stored again: a candidate that agrees everywhere)
    and v3 (classes 3 and 5 swapped: one that disagrees on those), stored."""
    import shutil

    from cnnserve.export.store import store_model

    other = swapped(default_onnx, folder / "model.onnx")
    for f in default_onnx.parent.glob("model.*"):  # its metadata's companions (the verification report)
        if f.name != "model.onnx" and f.is_file():
            shutil.copy(f, other.parent / f.name)
    return {name: {"v1": store_model(default_onnx, name=name).tag.version,
                   "v2": store_model(default_onnx, name=name).tag.version,
                   "v3": store_model(other, name=name).tag.version} for name in names}


@pytest.fixture(scope="module")
def versions(default_onnx, tmp_path_factory):
    return store_versions(default_onnx, tmp_path_factory.mktemp("swapped"), NAMES)


@pytest.fixture(scope="module")
def server(versions, tmp_path_factory):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text(TOKEN + "\n")
    models = " ".join(f"{n}:{v['v1']}" for n, v in versions.items())
    capture = tmp_path_factory.mktemp("capture")
    srv = Server("--arg", f"models={models}", "--arg", "model_control=true", "--arg", f"control_token_file={token}",
                 "--arg", "workers=2", "--arg", f"feedback_ring={RING}", "--arg", "model_sync_s=0.2",
                 "--arg", f"shadow_queue={SHADOW_QUEUE}", "--arg", f"capture_dir={capture}", "--arg", "capture_rate=1")
    srv.token_file, srv.capture = token, capture
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def digits() -> list[bytes]:
    """Handwritten digits (scikit-learn's, as the default model was trained on) as PNGs: inputs the model answers
    with varied classes."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images[:200]
    return [encode(np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((28, 28)))) for im in images]


def _open_store(path: str, barrier, results) -> None:
    from cnnserve.service.rollout import Store

    barrier.wait()
    try:
        Store(path, 10)
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - what a worker starting beside another would have died of
        results.put(f"{type(e).__name__}: {e}")


def test_workers_starting_together_each_open_the_rollout_file(tmp_path):
    """Every worker of a server opens the one rollout file as it starts; eight at once, twenty times over, each
    opens it. Before a file lock ordered them, about one worker in thirty died of "database is locked" (switching
    a new file to WAL does not wait), and with it the server's start."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    failures = []
    for trial in range(20):
        path, barrier, results = str(tmp_path / f"{trial}.sqlite"), ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_open_store, args=(path, barrier, results)) for _ in range(8)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
        failures += [o for o in outcomes if o != "ok"]
    assert not failures, failures


def classify(srv, name: str, image: bytes, rid: str | None = None, version: str | None = None) -> dict:
    """One request on a connection of its own (so the two workers share them), its id in the answer."""
    params = {"model": name, **({"version": version} if version else {})}
    headers = {"Content-Type": "image/png", "Connection": "close", **({"X-Request-ID": rid} if rid else {})}
    r = httpx.post(f"{srv.url}/classify", params=params, content=image, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return {**r.json(), "id": r.headers["x-request-id"]}


def control(srv, name: str, action: str, **params) -> httpx.Response:
    return httpx.post(f"{srv.url}/v2/repository/models/{name}/{action}", json={"parameters": params}, headers=AUTH,
                      timeout=180)


def feedback(srv, name: str, rid: str, label, index: int = 0) -> httpx.Response:
    return httpx.post(f"{srv.url}/v2/models/{name}/feedback", json={"id": rid, "label": label, "index": index},
                      headers={"Connection": "close"}, timeout=60)


def monitor(srv, name: str) -> dict:
    r = httpx.get(f"{srv.url}/models/{name}/monitor", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["rollout"]


def other_label(label: str) -> str:
    return str((int(label) + 1) % 10)


def test_feedback_joins_every_answer_whichever_worker_gave_it(server, versions, digits):
    name, v1 = "ro-feedback", versions["ro-feedback"]["v1"]
    answers, right = [], 0
    for i in range(30):  # each label at once, on a connection of its own: often to the worker that did not answer
        a = classify(server, name, digits[i], f"fb-{i}-{uuid.uuid4().hex[:6]}")
        answers.append(a)
        top = a["predictions"][0]["label"]
        label = top if i % 3 else other_label(top)
        r = feedback(server, name, a["id"], label if i % 2 else int(label))  # a class name, or its index
        assert r.status_code == 200, r.text
        assert r.json()["version"] == v1 and r.json()["correct"] == bool(i % 3)
        right += bool(i % 3)
    figures = monitor(server, name)["versions"][v1]
    assert right == 20 and (figures["labelled"], figures["correct"]) == (30, 20)
    assert abs(figures["accuracy"] - 20 / 30) < 1e-9
    assert sum(c["count"] for c in figures["confusion"]) == 30
    assert all(c["label"] in [str(k) for k in range(10)] for c in figures["confusion"])  # class names

    # a batch request: each image its own answer, by its index
    r = httpx.post(f"{server.url}/classify/batch", params={"model": name}, headers={"X-Request-ID": "fb-batch"},
                   files=[("images", (f"{i}.png", digits[i], "image/png")) for i in range(3)], timeout=60)
    assert r.status_code == 200, r.text
    for i, result in enumerate(r.json()["results"]):
        f = feedback(server, name, "fb-batch", other_label(result["predictions"][0]["label"]), index=i)
        assert f.status_code == 200 and f.json()["correct"] is False and f.json()["index"] == i, f.text
    assert feedback(server, name, "fb-batch", "3", index=3).status_code == 404  # no fourth image
    figures = monitor(server, name)["versions"][v1]
    assert (figures["labelled"], figures["correct"]) == (33, 20)

    for body, code in ((b"not json", "bad_json"), (b"[1]", "bad_request"), (b'{"id": 7, "label": "3"}', "bad_id"),
                       (json.dumps({"id": "x" * 129, "label": "3"}).encode(), "bad_id"),
                       (json.dumps({"id": answers[0]["id"], "label": "3", "index": True}).encode(), "bad_index")):
        r = httpx.post(f"{server.url}/v2/models/{name}/feedback", content=body, timeout=60)
        assert r.status_code == 400 and r.json()["code"] == code, (body, r.text)
    assert feedback(server, "no-such-model", answers[0]["id"], "3").status_code == 404
    r = feedback(server, name, "never-answered", "3")
    assert r.status_code == 404 and str(RING) in r.json()["error"]
    for bad in ("not-a-class", 10, -1, True, None):
        r = feedback(server, name, answers[0]["id"], bad)
        assert r.status_code == 400 and r.json()["code"] == "bad_label", (bad, r.text)
        assert "'0'" in r.json()["error"]  # names the allowed form: the model's class names
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    deadline = time.monotonic() + 20
    while f'cnnserve_feedback_labelled{{model="{name}",version="{v1}"}}' not in metrics:  # set every 5 s
        assert time.monotonic() < deadline, "no feedback gauge in /metrics"
        time.sleep(1)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text

    # the ring: once RING newer answers came, the oldest id is gone, the newest found
    newer = [classify(server, name, digits[i])["id"] for i in range(RING + 5)]
    time.sleep(1)  # both workers flushed (model_sync_s 0.2)
    assert feedback(server, name, answers[0]["id"], "3").status_code == 404
    assert feedback(server, name, newer[-1], "3").status_code == 200


def share(rid: str) -> float:
    from cnnserve.service.rollout import share

    return share(rid)


def test_a_canary_takes_its_share_by_request_id_and_a_version_still_pins(server, versions, digits):
    name, v = "ro-canary", versions["ro-canary"]
    r = control(server, name, "canary", percent=25)
    assert r.status_code == 400  # no candidate named
    r = control(server, f"{name}:{v['v2']}", "canary", percent=25)
    assert r.status_code == 200, r.text
    # fixed ids, each request on a connection of its own (so both workers answer some): which version each gets
    # is the id's hash, the same in every worker, and these 200 ids send 24.5% to the candidate
    n, ids = 200, [f"canary-{i:03d}" for i in range(200)]
    got = [classify(server, name, digits[i], ids[i])["version"] for i in range(n)]
    assert got == [v["v2"] if share(i) < 0.25 else v["v1"] for i in ids]
    assert 0.20 <= sum(g == v["v2"] for g in got) / n <= 0.30
    again = [classify(server, name, digits[i], ids[i])["version"] for i in range(20)]
    assert again == got[:20]  # a retry with the same id sees the same version
    for pinned in ("v1", "v2"):
        assert {classify(server, name, digits[i], ids[i], v[pinned])["version"] for i in range(20)} == {v[pinned]}
    assert control(server, f"{name}:{v['v1']}", "canary", percent=10).status_code == 409  # the served one
    assert control(server, f"{name}:{v['v2']}", "canary", percent=0).status_code == 200  # ends
    assert {classify(server, name, digits[i], ids[i])["version"] for i in range(30)} == {v["v1"]}


def label_all(srv, name: str, n: int, digits) -> list[dict]:
    answers = [classify(srv, name, digits[i], uuid.uuid4().hex) for i in range(n)]
    time.sleep(0.6)  # the shadow runs finished and flushed
    for a in answers:
        assert feedback(srv, name, a["id"], a["predictions"][0]["label"]).status_code == 200
    return answers


def test_promote_refuses_until_the_figures_pass_then_rollback_restores(server, versions, digits):
    name, v = "ro-promote", versions["ro-promote"]
    assert control(server, f"{name}:{v['v2']}", "shadow", rate=1.0).status_code == 200
    label_all(server, name, 30, digits)
    time.sleep(0.6)
    shadow = monitor(server, name)["shadow"]
    assert [(s["primary"], s["candidate"], s["compared"], s["agreement"], s["mean_abs_dp"]) for s in shadow] == \
        [(v["v1"], v["v2"], 30, 1.0, 0.0)]  # the same file agrees everywhere

    env = {"CNNSERVE_CONTROL_TOKEN": TOKEN}
    cli = run_cli("promote", name, "--url", server.url, "--min-labelled", "100", env=env)
    assert cli.returncode == 1 and "labelled: the candidate has 30 labelled answers" in cli.stderr, cli.stderr
    assert "agreement" not in cli.stderr and "accuracy:" not in cli.stderr  # only what failed
    assert classify(server, name, digits[0])["version"] == v["v1"]  # nothing switched
    r = control(server, name, "promote", min_labelled=20, min_agreement=1.01)
    assert r.status_code == 400  # a threshold out of range
    cli = run_cli("promote", name, "--url", server.url, "--min-labelled", "20", env=env)
    assert cli.returncode == 0, cli.stderr
    assert {classify(server, name, digits[i])["version"] for i in range(10)} == {v["v2"]}
    assert classify(server, name, digits[0], version=v["v1"])["version"] == v["v1"]  # kept for the rollback
    # the rollback while 32 clients send all along: not one request fails
    import collections
    import threading
    from concurrent.futures import ThreadPoolExecutor

    stop, statuses = threading.Event(), collections.Counter()

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{server.url}/classify", params={"model": name}, content=digits[i % len(digits)],
                           headers={"Content-Type": "image/png"})
                statuses[r.status_code] += 1

    with ThreadPoolExecutor(32) as pool:
        clients = [pool.submit(client, i) for i in range(32)]
        time.sleep(1)
        cli = run_cli("rollback", name, "--url", server.url, env=env)
        time.sleep(1)
        stop.set()
        for c in clients:
            c.result()
    assert cli.returncode == 0 and v["v1"] in cli.stdout, cli.stderr
    assert statuses[200] > 32 and set(statuses) == {200}, statuses
    assert {classify(server, name, digits[i])["version"] for i in range(10)} == {v["v1"]}
    assert control(server, name, "rollback").status_code == 409  # nothing left to roll back


def test_a_shadow_of_a_different_model_disagrees_where_it_differs(server, versions, digits):
    name, v = "ro-shadow", versions["ro-shadow"]
    assert control(server, f"{name}:{v['v3']}", "shadow", rate=1.0).status_code == 200
    answers = label_all(server, name, 40, digits)
    time.sleep(0.6)
    (s,) = monitor(server, name)["shadow"]
    tops = [a["predictions"][0]["label"] for a in answers]
    differs = sum(t in ("3", "5") for t in tops)  # the swapped classes
    assert s["candidate"] == v["v3"] and s["compared"] == 40
    assert s["agreement"] == pytest.approx(1 - differs / 40) and 0 < differs < 40
    assert s["labelled"] == 40 and s["accuracy"] == pytest.approx(1 - differs / 40)  # labels: the primary's answers
    assert s["mean_abs_dp"] > 0 and s["candidate_ms_mean"] > 0
    r = control(server, name, "promote", min_labelled=10, min_agreement=0.98)
    assert r.status_code == 409 and r.json()["code"] == "promote_refused"
    assert any(f.startswith("agreement") for f in r.json()["failed"])
    assert any(f.startswith("accuracy") for f in r.json()["failed"])
    assert classify(server, name, digits[0])["version"] == v["v1"]

    # under load the shadow goes first: 64 clients at once, every one answered by the primary; a request whose
    # images would leave the candidate holding more than shadow_queue is not shadowed, and is counted (whether the
    # burst itself fills a queue depends on how fast this machine's clients are: a batch of shadow_queue + 1
    # images always does)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(64) as pool:
        answered = list(pool.map(lambda i: classify(server, name, digits[i % 200])["version"], range(256)))
    assert answered == [v["v1"]] * 256
    time.sleep(0.6)
    (before,) = monitor(server, name)["shadow"]
    files = [("images", (f"{i}.png", digits[i], "image/png")) for i in range(SHADOW_QUEUE + 1)]
    r = httpx.post(f"{server.url}/classify/batch", params={"model": name}, files=files, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == v["v1"], r.text
    time.sleep(0.6)
    (s,) = monitor(server, name)["shadow"]
    assert s["dropped"] > before["dropped"], (before, s)
    assert control(server, name, "rollback").status_code == 200  # ends the shadow
    time.sleep(0.6)
    assert monitor(server, name)["routes"] == {}


# -- the state machine ----------------------------------------------------------------------------------------------

def make_machine(srv, v: dict, images: list[bytes]):
    """Hypothesis's steps over model ``ro-states`` (v1 and v2 the same file, v3 answering 3 for 5 and back), with
    what the server must do after each (docs/rollout.md, "Invariants")."""
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

    from cnnserve.service.rollout import promotion_failures

    name = "ro-states"
    now_and_then = st.sampled_from([False] * 4 + [True])  # a canary or shadow of the served version: refused

    class Machine(RuleBasedStateMachine):
        @initialize(which=st.integers(0, 1), percent=st.sampled_from([0, 30, 100]), rate=st.sampled_from([0, 1.0]))
        def start(self, which, percent, rate):
            """v1 served, and most often a rollout under way already (so that promote is reached early)."""
            r = control(srv, f"{name}:{v['v1']}", "load")  # a plain load ends any rollout of the model
            assert r.status_code == 200, r.text
            self.primary, self.canary, self.shadow, self.previous = "v1", None, None, None
            self.canary_(which, percent, False)
            self.shadow_(which, rate, False)

        def routed(self) -> bool:
            return bool(self.canary or self.shadow or self.previous)

        def other(self, which: int) -> str:
            return [k for k in v if k != self.primary][which]

        @rule(which=st.integers(0, 1), percent=st.sampled_from([0, 30, 100]), served=now_and_then)
        def canary_(self, which, percent, served):
            cand = self.primary if served else self.other(which)
            r = control(srv, f"{name}:{v[cand]}", "canary", percent=percent)
            if percent and cand == self.primary:
                assert r.status_code == 409, r.text  # never the served version itself
                return
            assert r.status_code == 200, r.text
            self.canary = (cand, percent) if percent else None

        @rule(which=st.integers(0, 1), rate=st.sampled_from([0, 1.0, 1.0]), served=now_and_then)
        def shadow_(self, which, rate, served):
            cand = self.primary if served else self.other(which)
            r = control(srv, f"{name}:{v[cand]}", "shadow", rate=rate)
            if rate and cand == self.primary:
                assert r.status_code == 409, r.text
                return
            assert r.status_code == 200, r.text
            self.shadow = (cand, rate) if rate else None

        @precondition(lambda self: self.canary or self.shadow)
        @rule(min_labelled=st.sampled_from([0, 3, 10_000]), min_agreement=st.sampled_from([0, 0.5, 1.0]))
        def promote(self, min_labelled, min_agreement):
            r = control(srv, name, "promote", min_labelled=min_labelled, min_agreement=min_agreement)
            cand = (self.canary or self.shadow or (None,))[0]
            if cand is None:
                assert r.status_code == 409 and r.json()["code"] == "promote_failed", r.text
                return
            if r.status_code == 409:  # never switches when a figure fails, and says which
                assert r.json()["code"] == "promote_refused" and r.json()["failed"], r.text
                assert promotion_failures(r.json()["figures"], min_agreement, min_labelled, 0.0) == r.json()["failed"]
                STEPS["promote refused"] += 1
                return
            STEPS["promoted"] += 1
            assert min_labelled != 10_000 and r.status_code == 200, r.text
            assert not promotion_failures(r.json()["figures"], min_agreement, min_labelled, 0.0)
            self.previous, self.primary, self.canary, self.shadow = self.primary, cand, None, None

        @precondition(lambda self: self.routed())
        @rule()
        def rollback(self):
            r = control(srv, name, "rollback")
            if not self.routed():
                assert r.status_code == 409, r.text
                return
            assert r.status_code == 200, r.text
            STEPS["rolled back to the previous" if self.previous else "rolled back a canary or shadow"] += 1
            self.primary = self.previous or self.primary
            assert r.json()["serving"] == v[self.primary]
            self.canary = self.shadow = self.previous = None

        @rule(pin=st.sampled_from([None, None, "v1", "v2", "v3"]), n=st.integers(1, 6))
        def traffic_and_feedback(self, pin, n):
            loaded = {self.primary} | {r[0] for r in (self.canary, self.shadow) if r} | {self.previous} - {None}
            pinned = pin if pin in loaded else None
            by_version = {ver: key for key, ver in v.items()}
            for i in range(n):
                rid = uuid.uuid4().hex
                a = classify(srv, name, images[i], rid, v[pinned] if pinned else None)
                got, rid = by_version[a["version"]], a["id"]  # the id the server went by
                STEPS["pinned" if pinned else "to the canary" if got == (self.canary or ("",))[0] else "served"] += 1
                if pinned:
                    assert got == pinned  # a pinned version is always answered by that version
                elif self.canary and share(rid) < self.canary[1] / 100:
                    assert got == self.canary[0], (rid, self.canary)
                else:
                    assert got == self.primary  # the canary takes no more than its share
                f = feedback(srv, name, rid, a["predictions"][0]["label"])
                assert f.status_code == 200 and f.json()["version"] == a["version"] and f.json()["correct"], f.text

        @invariant()
        def shadows_of_the_same_file_agree(self):
            for s in monitor(srv, name)["shadow"]:
                STEPS["shadow pairs seen"] += 1
                pair = {by for by, ver in v.items() if ver in (s["primary"], s["candidate"])}
                if pair == {"v1", "v2"}:
                    assert s["agreement"] == 1.0 and s["mean_abs_dp"] == 0.0, s

    return Machine


def test_the_capture_keeps_what_was_sent_and_answered_under_the_answers_id(server, versions, digits):
    """With capture_rate=1 every answered image lands in the capture folder (both workers write into it): its bytes
    as sent, under the id the answer carried, with the version that answered and the answer's top-k; each image
    of a /classify/batch request under the request's id and its index."""
    name = "ro-feedback"
    sent = {}
    for i in range(6):
        a = classify(server, name, digits[100 + i], f"cap-{i}-{uuid.uuid4().hex[:6]}")
        sent[a["id"]] = (digits[100 + i], a)
    files = [("images", (f"{i}.png", digits[110 + i], "image/png")) for i in range(3)]
    r = httpx.post(f"{server.url}/classify/batch", params={"model": name}, files=files, timeout=60)
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        sent[f"{r.headers['x-request-id']}-{res['index']}"] = (digits[110 + res["index"]], {**res, **r.json()})
    rows, deadline = {}, time.monotonic() + 30
    while set(sent) - set(rows) and time.monotonic() < deadline:  # written off the request path, by a thread
        time.sleep(0.2)
        for manifest in server.capture.glob("manifest-*.jsonl"):
            for line in manifest.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows[row["id"]] = row
    assert not set(sent) - set(rows), f"not captured: {set(sent) - set(rows)}"
    for rid, (image, answer) in sent.items():
        row = rows[rid]
        assert (server.capture / row["path"]).read_bytes() == image
        assert (row["model"], row["version"]) == (name, answer["version"])
        assert row["labels"] == [p["label"] for p in answer["predictions"]]
        assert row["probabilities"] == pytest.approx([p["probability"] for p in answer["predictions"]])


def test_rollout_as_a_state_machine(server, versions, digits):
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.stateful import run_state_machine_as_test

    STEPS.clear()
    machine = make_machine(server, versions["ro-states"], digits)
    # derandomized: the same examples every run, so the floor below holds (CNNSERVE_ROLLOUT_EXAMPLES explores more)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=int(os.environ.get("CNNSERVE_ROLLOUT_EXAMPLES", 6)), stateful_step_count=8, deadline=None,
        derandomize=True, phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck)))
    print("rollout state machine:", dict(STEPS))
    for what in ("promote refused", "promoted", "to the canary", "pinned"):  # (a rollback: the test above)
        assert STEPS[what], f"the examples never reached '{what}': {dict(STEPS)}"
