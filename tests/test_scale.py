"""Past one machine (README "Deploying at scale"): cnnserve replicas behind a real HAProxy with the project's
configuration (deploy/haproxy/haproxy.cfg), on loopback. A rolling restart under 64 clients loses nothing;
a replica killed loses only what it held, and HAProxy takes it out within its checks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bench import lb
from tests.conftest import encode

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("haproxy") is None,
                                 reason="haproxy is not installed (.ci/run installs Debian's haproxy with apt)")]
CLIENTS = 64


@pytest.fixture(scope="module")
def bodies(digits_test):
    x = digits_test[0]
    return [(encode(x[i][0]), "image/png") for i in range(8)]


@pytest.fixture(scope="module")
def fleet(stored_default):
    """Two replicas of one worker each (2 cores here) and the balancer in front of them."""
    servers = lb.replicas(2, "--arg", f"models={stored_default}", "--arg", "workers=1")
    balancer = lb.Balancer([s.port for s in servers], grpc=[s.grpc_port for s in servers])
    yield servers, balancer
    balancer.stop()
    for s in servers:
        s.stop()


def test_grpc_goes_through_haproxy_over_http2(fleet, digits_test, stored_default):
    """The balancer's gRPC frontend (HTTP/2 both sides): each replica's gRPC port is UP, checked on its HTTP
    port's /readyz, and tritonclient's calls through it are answered by the replicas."""
    import tritonclient.grpc as tg

    servers, balancer = fleet
    for name in balancer.names:
        assert balancer.wait_for(name, "UP", 30, backend="replicas_grpc") is not None, balancer.states("replicas_grpc")
    client = tg.InferenceServerClient(f"127.0.0.1:{balancer.grpc_port}")
    assert client.is_server_ready()
    x = digits_test[0][:4]
    t = tg.InferInput("pixels", list(x.shape), "UINT8")
    t.set_data_from_numpy(x)
    model = stored_default.split(":")[0]
    probs = client.infer(model, [t], client_timeout=30).as_numpy("probabilities")
    assert probs.shape == (4, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    direct = tg.InferenceServerClient(servers[0].grpc_target).infer(model, [t], client_timeout=30)
    assert np.allclose(probs, direct.as_numpy("probabilities"), atol=1e-6)  # the replicas' own answer


def test_rolling_restart_behind_haproxy_loses_nothing(fleet, bodies):
    servers, balancer = fleet
    assert balancer.wait_for("r1", "UP", 30) is not None and balancer.wait_for("r2", "UP", 30) is not None
    out = lb.rolling_restart_trial(servers, balancer, bodies, clients=CLIENTS)
    assert out["failed"] == 0 and out["non_200"] == 0, out
    assert out["answered"] > 0
    for step in out["steps"]:  # each replica left the rotation on its drain, and came back
        assert step["out_of_rotation_s"] is not None and step["back_up_s"] is not None, out


def test_killed_replica_costs_only_what_it_held(fleet, bodies):
    servers, balancer = fleet
    assert balancer.wait_for("r1", "UP", 60) is not None and balancer.wait_for("r2", "UP", 60) is not None
    out = lb.kill_trial(servers, balancer, bodies, clients=CLIENTS)
    assert out["out_of_rotation_s"] is not None, out  # HAProxy's checks took it out (time: the report)
    # a request that reached the killed replica is lost (it is never re-sent: it may have run): no answer, or
    # HAProxy's 502/504; each of the clients has at most one in flight, and the other replica answered the
    # rest. A 503 is that replica shedding what it cannot take in time (all 64 clients on its 2 workers, on a
    # loaded machine): its designed answer to overload, not a request the kill lost.
    lost = out["failed"] + sum(n for status, n in out["statuses"].items() if status not in (200, 503))
    assert lost <= CLIENTS, out
    assert out["answered_after_kill"] > 0 and out["statuses"].get(200, 0) > 0, out


def test_ray_cluster_of_three_nodes_scores_every_row_once_with_a_node_killed(default_onnx, tmp_path):
    """``cnnserve score --engine ray --ray-address`` on a head and two worker nodes started with ``ray start``
    (separate processes, one CPU each): every node scores a share; a worker node killed mid-run loses
    nothing (Ray retries its tasks elsewhere, and whatever the run could not finish, --resume completes):
    each input has exactly one row."""
    import csv
    import subprocess
    import time

    from PIL import Image

    from bench.raycluster import RayCluster
    from tests.conftest import CNNSERVE

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    n = 6000
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    out = tmp_path / "preds.csv"
    with RayCluster(workers=2, cpus=1) as cluster:
        cmd = [*CNNSERVE, "score", str(folder), "--model", str(default_onnx), "--engine", "ray",
               "--ray-address", cluster.address, "--batch-size", "32", "--out", str(out)]
        first = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        nodes = dict(line.rsplit(" ", 1) for line in first.stderr.split("images per Ray node: ")[1]
                     .splitlines()[0].split(", "))
        assert len(nodes) == 3 and sum(map(int, nodes.values())) == n, first.stderr[-1000:]  # every node worked
        # again, into a new file, with a worker node killed once the first rows are written
        out.unlink()
        run = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while run.poll() is None and (not out.exists() or out.stat().st_size < 20_000):
            time.sleep(0.05)
        assert run.poll() is None, "the run finished before a node could be killed"
        cluster.kill(0)
        _, err = run.communicate(timeout=300)
        if run.returncode != 0:  # the run gave up: the journal keeps what it wrote, --resume completes it
            again = subprocess.run([*cmd, "--resume"], env=cluster.env, capture_output=True, text=True, timeout=300)
            assert again.returncode == 0, again.stderr[-3000:]
    with out.open() as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    assert len(paths) == n and len(set(paths)) == n, (len(paths), len(set(paths)), err[-2000:])
