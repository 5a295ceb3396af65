"""Past one machine (README "Deploying at scale"): cnnserve replicas behind a real HAProxy with the project's
configuration (deploy/haproxy/haproxy.cfg), on loopback. A rolling restart under 64 clients loses nothing;
a replica killed loses only what it held, and HAProxy takes it out within its checks."""

from __future__ import annotations

import shutil

import pytest

from cnnserve.bench import lb
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
    balancer = lb.Balancer([s.port for s in servers])
    yield servers, balancer
    balancer.stop()
    for s in servers:
        s.stop()


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
    # a request that reached the killed replica is lost (it is never re-sent: it may have run); each of the
    # clients has at most one in flight, and the other replica answered the rest
    assert out["failed"] + out["non_200"] <= CLIENTS, out
    assert out["answered_after_kill"] > 0 and out["statuses"].get(200, 0) > 0, out
