"""The runtime control plane against hostile stores and racing operators, on a real two-worker server: every
load runs the start-up checks first, in a trial process with a deadline and a memory cap; a larger model loads
into a server started with a smaller one; decisions about the served set (the last model, the default) are made
once against the shared set; a worker's refusal is answered, not counted as applied; tags are the store's; the
open index reads the store once per change; what a client sent is cut before it is echoed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import Server, encode
from tests.support import faults, hostile

pytestmark = pytest.mark.slow
TOKEN = "test-token-control"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CAP_MB = 8192  # every process of the server: a regression costs this test, not the machine
NAME, OTHER, WIDE = "lenet5-digits", "digits-b", "tiny96"


def tiny_model(src: Path, out: Path, channels: int = 3, size: int = 96, classes: int = 4) -> str:
    """A real classifier graph at ``channels`` x ``size`` x ``size``: the mean of each channel through one dense
    layer; its metadata is the export at ``src``'s with the input, normalisation and labels changed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cnnserve.core import onnxmeta

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(channels, classes)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Cast", [onnxmeta.INPUT], ["x"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
         helper.make_node("Div", ["m", "scale"], ["n"]),
         helper.make_node("MatMul", ["n", "w"], [onnxmeta.LOGITS]),
         helper.make_node("Softmax", [onnxmeta.LOGITS], [onnxmeta.PROBABILITIES], axis=1)],
        "tiny", [helper.make_tensor_value_info(onnxmeta.INPUT, TensorProto.UINT8, ["batch", channels, size, size])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", classes]) for o in onnxmeta.OUTPUTS],
        [weights, numpy_helper.from_array(np.array(255.0, np.float32), "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = onnx.load(str(src))
    for p in source.metadata_props:
        if p.key != onnxmeta.KEY_SAMPLES:
            model.metadata_props.add(key=p.key, value=p.value)
    hostile._set_meta(model, channels=channels, height=size, width=size, mean=[0.5] * channels,
                      std=[0.25] * channels, labels=[f"kind-{i}" for i in range(classes)])
    onnx.save(model, str(out))
    return str(out)


def stored_hostile(default_onnx: Path, tmp: Path, name: str, make, *args) -> str:
    """A version of ``name`` in the store whose file is then replaced by a hostile one (as anyone who can write
    to the store could): the store's own check passed on the real export."""
    import bentoml

    from cnnserve.export.store import store_model

    stored = bentoml.models.get(store_model(default_onnx, name=name).tag)
    bad = make(default_onnx, tmp / f"{name}.onnx", *args)
    Path(stored.path_of("model.onnx")).write_bytes(Path(bad).read_bytes())
    return stored.tag.version


@pytest.fixture(scope="module")
def store(default_onnx, stored_default, tmp_path_factory):
    """The models the server may load: the default model (v1, v2), a second name, a 3x96x96 model, and four
    hostile files: 5 labels for 10 columns, a claimed 5792x5792 input, NaN outputs, a warm-up that never ends."""
    from cnnserve.export.store import store_model

    tmp = tmp_path_factory.mktemp("control")
    v = {"v1": store_model(default_onnx, name=NAME).tag.version, "v2": store_model(default_onnx, name=NAME).tag.version,
         "other": store_model(default_onnx, name=OTHER).tag.version}
    v["wide"] = store_model(tiny_model(default_onnx, tmp / "tiny.onnx"), name=WIDE).tag.version
    v["labels"] = stored_hostile(default_onnx, tmp, "bad-labels", hostile.model_with_labels)
    v["huge"] = stored_hostile(default_onnx, tmp, "bad-huge", hostile.model_claiming_input, 5792, 5792)
    v["nan"] = stored_hostile(default_onnx, tmp, "bad-nan", hostile.model_giving_nan)
    v["forever"] = stored_hostile(default_onnx, tmp, "bad-forever", hostile.model_never_ending)
    return v


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text(TOKEN + "\n")
    srv = Server("--arg", f"models={NAME}:{store['v1']} {OTHER}:{store['other']}", "--arg", "model_control=true",
                 "--arg", f"control_token_file={token}", "--arg", "keep_versions=2", "--arg", "workers=2",
                 "--arg", "load_timeout_s=8", memory_limit_mb=CAP_MB)
    yield srv
    srv.stop()


def load(srv, name: str, **params) -> httpx.Response:
    return httpx.post(f"{srv.url}/v2/repository/models/{name}/load", json={"parameters": params} if params else {},
                      headers=AUTH, timeout=120)


def unload(srv, name: str) -> httpx.Response:
    return httpx.post(f"{srv.url}/v2/repository/models/{name}/unload", headers=AUTH, timeout=120)


def reports(srv) -> list[dict]:
    from cnnserve.service.modelstate import alive

    folder = Path(srv.home) / "cnnserve-servers" / str(srv.proc.pid) / "workers"
    found = [json.loads(p.read_text()) for p in folder.glob("*.json") if alive(int(p.stem))]
    return found


def converged(srv, timeout: float = 60) -> dict:
    """What every live worker serves, once they all serve the same (and at least two report)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = reports(srv)
        if len(seen) >= 2 and all(r["models"] == seen[0]["models"] and r.get("default") == seen[0].get("default")
                                  and not r.get("loading") for r in seen):
            return {"models": seen[0]["models"], "default": seen[0].get("default")}
        time.sleep(0.2)
    raise AssertionError(f"the workers did not converge: {reports(srv)}")


def digit() -> bytes:
    return encode((np.arange(28 * 28).reshape(28, 28) % 255).astype(np.uint8))


def classify(srv, **params) -> httpx.Response:
    return httpx.post(f"{srv.url}/classify", content=digit(), params=params,
                      headers={"Content-Type": "image/png"}, timeout=60)


def test_a_runtime_load_runs_the_start_up_checks_in_a_trial_first(server, store):
    """Each hostile file is refused with 400 and its reason, in the trial process: the workers never allocate
    for it (their memory stays flat), a warm-up that never ends is stopped at load_timeout_s, and the server
    serves and loads as before."""
    before = faults.tree_rss_mb(server.proc.pid)
    expected = {"bad-labels": "metadata names 5 labels", "bad-huge": "1x5792x5792", "bad-nan": "not finite",
                "bad-forever": "load_timeout_s"}
    for name, words in expected.items():
        t = time.monotonic()
        r = load(server, name)
        assert r.status_code == 400, (name, r.status_code, r.text[:400])
        assert r.json()["code"] == "load_failed" and words in r.json()["error"], (name, r.text[:400])
        assert time.monotonic() - t < 60, name  # answered by the server, not by BentoML's 60 s timeout
    assert faults.tree_rss_mb(server.proc.pid) < before + 300
    assert classify(server).status_code == 200
    assert load(server, f"{NAME}:{store['v2']}").status_code == 200  # the sync threads were not stuck behind it
    served = converged(server)["models"]
    assert served[NAME][-1] == store["v2"] and not any(n.startswith("bad-") for n in served)
    index = httpx.post(f"{server.url}/v2/repository/index", json={}).json()
    states = {r["name"]: r["state"] for r in index if r["name"].startswith("bad-")}
    assert states == dict.fromkeys(expected, "UNAVAILABLE")


def test_a_larger_model_loads_into_a_server_started_with_a_smaller_one(server, store):
    """LeNet-5's 784-byte inputs at start; a 3x96x96 model loaded later gets decoding buffers that hold its
    input, and a 300x300 photo (decoded in a decoding process, not inline) is classified by it."""
    from PIL import Image

    r = load(server, WIDE)
    assert r.status_code == 200, r.text
    converged(server)
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 300, 3), np.uint8))
    body = encode(np.asarray(photo), "JPEG", quality=90)
    for _ in range(4):  # both workers, both their decoding processes
        r = httpx.post(f"{server.url}/classify", content=body, params={"model": WIDE},
                       headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == WIDE and r.json()["predictions"][0]["label"].startswith("kind-")
    assert classify(server).status_code == 200  # the smaller model still decodes
    assert unload(server, WIDE).status_code == 200


def test_two_unloads_at_the_same_instant_leave_one_model_served(server, store):
    """The last-model rule is decided once, against the shared set: of two unloads sent together, one passes
    and the other is refused 409, three times over; every worker then serves the same one model."""
    for attempt in range(3):
        assert load(server, f"{NAME}:{store['v2']}").status_code == 200
        assert load(server, f"{OTHER}:{store['other']}").status_code == 200
        converged(server)
        start, answers = threading.Barrier(2), {}

        def go(name: str) -> None:
            start.wait()
            answers[name] = unload(server, name)

        threads = [threading.Thread(target=go, args=(n,)) for n in (NAME, OTHER)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        codes = sorted(a.status_code for a in answers.values())
        assert codes == [200, 409], (attempt, {n: (a.status_code, a.text[:200]) for n, a in answers.items()})
        served = converged(server)["models"]
        assert len(served) == 1, served
    assert load(server, f"{NAME}:{store['v2']}").status_code == 200
    assert load(server, f"{OTHER}:{store['other']}").status_code == 200


def test_the_default_is_the_operators_and_survives_unloads_and_respawns(server, store):
    """Without a model a request goes to the default the operator set, or gets 409 while it is not loaded; it
    never reaches another model by accident. A load with default=true sets it; a respawned worker keeps it."""
    assert load(server, f"{NAME}:{store['v2']}").status_code == 200
    assert load(server, f"{OTHER}:{store['other']}").status_code == 200
    assert converged(server)["default"] == NAME
    assert unload(server, NAME).status_code == 200
    converged(server)
    for _ in range(6):  # both workers
        r = classify(server)
        assert r.status_code == 409 and r.json()["code"] == "default_unavailable", r.text
        assert classify(server, model=OTHER).status_code == 200
    assert load(server, NAME).status_code == 200  # loaded again: the default again
    converged(server)
    assert {classify(server).json()["model"] for _ in range(6)} == {NAME}
    assert load(server, OTHER, default=True).status_code == 200
    assert converged(server)["default"] == OTHER
    assert {classify(server).json()["model"] for _ in range(6)} == {OTHER}
    victim = faults.worker_pids(server)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (victim in faults.worker_pids(server) or len(faults.worker_pids(server)) < 2):
        time.sleep(0.5)
    assert converged(server, 90)["default"] == OTHER
    assert {classify(server).json()["model"] for _ in range(8)} == {OTHER}
    assert load(server, NAME, default=True).status_code == 200
    r = load(server, NAME, default="yes")
    assert r.status_code == 400 and r.json()["code"] == "bad_parameters"


@pytest.mark.parametrize("path, body", [
    ("lenet5-digits:..", None), (":abc", None), ("lenet5-digits:a:b", None), ("lenet5-digits:", None),
    ("lenet5-digits", {"parameters": {"version": "../../x"}}), ("lenet5-digits", {"parameters": {"version": 7}}),
    ("x" * 10_000, None), ("lenet5-digits:" + "v" * 64, None), ("-lenet5", None)])
def test_bad_tags_are_refused_with_400(server, path, body):
    for action in ("load", "unload"):
        r = httpx.post(f"{server.url}/v2/repository/models/{path}/{action}", json=body or {}, headers=AUTH, timeout=60)
        assert r.status_code == 400, (action, path, r.status_code, r.text[:300])
        assert r.json()["code"] in ("bad_tag", "bad_parameters") and len(r.text) < 1000


def test_case_variants_of_a_name_are_one_model(server, store):
    """The store spells names in lowercase: every spelling loads the one model, never a second one."""
    spellings = ["LENET5-DIGITS", "Lenet5-Digits", "lenet5-DIGITS", "LeNet5-digits"]
    for s in spellings:
        assert load(server, f"{s}:{store['v2']}").status_code == 200, s
    served = converged(server)["models"]
    assert [n for n in served if n.lower() == NAME] == [NAME], served
    assert httpx.post(f"{server.url}/v2/repository/models/LENET5-DIGITS:{store['v2'].upper()}/load",
                      headers=AUTH, timeout=60).status_code == 200


def test_the_open_index_reads_the_store_once_per_change(server, store, default_onnx):
    """The index is open to anyone, so it costs what a look at the store's folders costs: the listing is read
    again only when a version is stored (and then shows it)."""
    from cnnserve.export.store import store_model
    from cnnserve.service import repository

    first = repository.stored_versions()
    read_at = repository._store["at"]
    assert repository.stored_versions() == first and repository._store["at"] == read_at  # not read again
    new = store_model(default_onnx, name=NAME).tag.version
    assert (NAME, new) in repository.stored_versions() and repository._store["at"] > read_at
    rows = httpx.post(f"{server.url}/v2/repository/index", json={}).json()
    assert {"name": NAME, "version": new, "state": "UNAVAILABLE", "reason": "unloaded"} in rows
    # side by side, in one run: what an index call costs against a classify call (reported, not asserted)
    costs = {}
    for what, call in (("index", lambda: httpx.post(f"{server.url}/v2/repository/index", json={})),
                       ("classify", lambda: classify(server))):
        t = time.perf_counter()
        for _ in range(30):
            assert call().status_code == 200
        costs[what] = (time.perf_counter() - t) / 30
    print(f"index {costs['index'] * 1000:.1f} ms a call, classify {costs['classify'] * 1000:.1f} ms")


def test_client_strings_are_cut_before_they_are_echoed(server):
    """A 100 KB model name over gRPC is answered NOT_FOUND with a short message (it came back
    RESOURCE_EXHAUSTED when the message carried it whole); over HTTP too."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    long_name = "m" * 100_000
    client = grpcclient.InferenceServerClient(server.grpc_target)
    x = grpcclient.InferInput("pixels", [1, 1, 28, 28], "UINT8")
    x.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.uint8))
    with pytest.raises(InferenceServerException) as e:
        client.infer(long_name, [x])
    assert e.value.status() == "StatusCode.NOT_FOUND" and len(e.value.message()) < 1000, e.value.status()
    r = httpx.post(f"{server.url}/v2/models/{'m' * 20_000}/infer", timeout=60,
                   json={"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                     "data": [0] * 784}]})
    assert r.status_code == 404 and len(r.text) < 1000, (r.status_code, r.text[:200])


def test_a_refusal_by_another_worker_is_answered_and_undone(default_onnx, tmp_path):
    """Two workers' shares in one served set, in-process (real managers, real files): the second worker's
    memory budget refuses a version the first loaded. The control request's wait answers that refusal
    (status and reason) instead of counting it as applied, and the roll-back gives every worker the set it had."""
    from cnnserve.core.config import Settings
    from cnnserve.core.runtime import load_model
    from cnnserve.export.store import store_model
    from cnnserve.service.engine import Engine
    from cnnserve.service.modelstate import ServedState, stored_file
    from cnnserve.service.workers import WorkerSync

    v1, v2 = (store_model(default_onnx, name="refused").tag.version for _ in range(2))
    state = ServedState(tmp_path / "server")
    state.reset([("refused", v1)])
    roomy, tight = Settings(workers=2, model_sync_s=0.1), Settings(workers=2, model_sync_s=0.1,
                                                                    max_model_memory_mb=0.001)
    engines = [Engine([load_model(default_onnx, name="refused", version=v1)], s) for s in (roomy, tight)]
    syncs = [WorkerSync(e, state, s) for e, s in zip(engines, (roomy, tight))]
    syncs[1].pid = os.getppid()  # two workers' reports in one process: the other one under a live pid of its own
    try:
        for s in syncs:
            s.step()
        engines[0].registry.load("refused", v2, stored_file("refused", v2)[1])
        generation, before = syncs[0].record_load("refused", v2, keep=2)

        async def wait():
            for s in syncs:
                s.step()
            return await syncs[0].wait_for(generation, 2, 30, f"refused:{v2}")

        done, refused = asyncio.run(wait())
        assert not done and refused is not None and refused[0] == 507 and "max_model_memory_mb" in refused[1]
        syncs[0].roll_back("refused", before, generation)
        for s in syncs:
            s.step()
        assert [e.registry.loaded() for e in engines] == [{"refused": [v1]}] * 2
        assert state.read()["models"] == {"refused": [v1]}
    finally:
        for e in engines:
            e.close()


def test_a_trial_ends_with_the_worker_that_started_it(default_onnx, tmp_path):
    """The deadline is the worker's: a worker killed with -9 while its trial of a never-ending warm-up runs must
    not leave the trial running under init (it kept a core busy for minutes)."""
    import subprocess
    import sys

    forever = hostile.model_never_ending(default_onnx, tmp_path / "forever.onnx")
    worker = subprocess.Popen([sys.executable, "-c", "from cnnserve.core.servable import trial; "
                               f"trial({forever!r}, timeout_s=120)"])

    def trials() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and b"cnnserve.core.servable" in (entry / "cmdline").read_bytes() \
                        and forever.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    try:
        deadline = time.monotonic() + 30
        while not trials() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert trials(), "the trial did not start"
        time.sleep(1.0)  # it is running the Loop now
    finally:
        worker.kill()
        worker.wait()
    deadline = time.monotonic() + 5
    while trials() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = trials()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "the trial outlived the worker that started it"


def test_a_trial_runs_under_a_server_that_is_pid_1(default_onnx):
    """In a container the server is pid 1: a trial child that took a parent of pid 1 for a dead parent exited at
    once, and the container never became ready."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for a pid namespace of its own")
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                           "import os; assert os.getpid() == 1; from cnnserve.core.servable import trial; "
                           f"trial({str(default_onnx)!r}); print('trial passed')"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "trial passed" in done.stdout, done.stderr[-2000:]
