"""The rollout commands as a user runs them (`cnnserve canary`, `shadow`, `promote`, `rollback`: command/remote.py),
in a subprocess, against one real two-worker server holding three versions of each model: what each command prints
and exits with, and that the server then does what it said (its figures, and which version answers).
tests/test_rollout.py tests the same routes over HTTP; here the client side: its messages for a wrong token, an
unknown version, an unreachable server and a refused promote, never a traceback.

Each test uses a model name of its own, so the figures of one (kept per model) are not another's."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import Server, run_cli
from tests.test_rollout import (classify, digits, feedback, monitor, share,  # noqa: F401 (digits: a fixture)
                                store_versions)

pytestmark = pytest.mark.slow
TOKEN = "test-token-rollout-cli"
NAMES = ("cli-canary", "cli-shadow", "cli-errors", "cli-promote")


@pytest.fixture(scope="module")
def versions(default_onnx, tmp_path_factory):
    return store_versions(default_onnx, tmp_path_factory.mktemp("swapped"), NAMES)


@pytest.fixture(scope="module")
def server(versions, tmp_path_factory):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text(TOKEN + "\n")
    models = " ".join(f"{n}:{v['v1']}" for n, v in versions.items())
    srv = Server("--arg", f"models={models}", "--arg", "model_control=true", "--arg", f"control_token_file={token}",
                 "--arg", "workers=2", "--arg", "model_sync_s=0.2")
    srv.token_file = token
    yield srv
    srv.stop()


def cli(srv, *args, token: str | None = None, use_file: bool = True):
    """The real command: the token from ``--token-file`` (the server's own file), or ``token`` in the environment."""
    env = {"CNNSERVE_CONTROL_TOKEN": token or ""}
    extra = ("--token-file", srv.token_file) if use_file and token is None else ()
    return run_cli(*args, "--url", srv.url, *extra, env=env, timeout=300)


def clean(proc) -> None:
    """A message, never a traceback (the command's errors are for people)."""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


def served_by(srv, name: str, ids: list[str], images) -> list[str]:
    return [classify(srv, name, images[i], rid)["version"] for i, rid in enumerate(ids)]


def test_canary_sends_its_share_and_percent_zero_ends_it(server, versions, digits):
    name, v = "cli-canary", versions["cli-canary"]
    done = cli(server, "canary", f"{name}:{v['v2']}", "--percent", "50")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"canary {name}:{v['v2']}: 50% of the requests that name no version\n"
    assert monitor(server, name)["routes"] == {"canary": {"version": v["v2"], "percent": 50.0}}
    ids = [uuid.uuid4().hex for _ in range(40)]
    got = served_by(server, name, ids, digits)
    assert got == [v["v2"] if share(rid) < 0.5 else v["v1"] for rid in ids]  # split by the id's hash
    assert set(got) == {v["v1"], v["v2"]}  # both took some (40 ids at 1/2: all on one side once in 5e11)

    done = cli(server, "canary", f"{name}:{v['v2']}", "--percent", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"canary {name}:{v['v2']}: 0% of the requests that name no version (ended)\n"
    assert monitor(server, name)["routes"] == {}
    assert set(served_by(server, name, ids, digits)) == {v["v1"]}


def test_shadow_runs_are_counted_and_rate_zero_ends_it(server, versions, digits):
    name, v = "cli-shadow", versions["cli-shadow"]
    done = cli(server, "shadow", f"{name}:{v['v2']}", "--rate", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"shadow {name}:{v['v2']}: 1 of the served version's requests run on it too\n"
    assert monitor(server, name)["routes"] == {"shadow": {"version": v["v2"], "rate": 1.0}}
    assert set(served_by(server, name, [uuid.uuid4().hex for _ in range(20)], digits)) == {v["v1"]}  # clients: v1
    shadow = _shadow_after(server, name, v["v2"], 20)
    assert (shadow["primary"], shadow["candidate"], shadow["compared"], shadow["agreement"]) == \
        (v["v1"], v["v2"], 20, 1.0)  # every request ran on the candidate too; the same file agrees

    done = cli(server, "shadow", f"{name}:{v['v2']}", "--rate", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"shadow {name}:{v['v2']}: 0 of the served version's requests run on it too (ended)\n"
    assert monitor(server, name)["routes"] == {}
    served_by(server, name, [uuid.uuid4().hex for _ in range(10)], digits)
    time.sleep(1)  # a shadow run would have been flushed by now (model_sync_s 0.2)
    assert [s["compared"] for s in monitor(server, name)["shadow"]] in ([], [20])  # no run since it ended


def _shadow_after(srv, name: str, candidate: str, compared: int) -> dict:
    """The figures of ``candidate``'s shadow once it compared ``compared`` requests (runs finish after the answers
    go out; a shadow's figures stay after it ends)."""
    deadline = time.monotonic() + 20
    while True:
        shadow = [s for s in monitor(srv, name)["shadow"] if s["candidate"] == candidate]
        if shadow and shadow[0]["compared"] >= compared or time.monotonic() > deadline:
            assert len(shadow) == 1, shadow
            return shadow[0]
        time.sleep(0.2)


def test_refusals_are_messages_with_a_nonzero_exit(server, versions, tmp_path):
    name, v = "cli-errors", versions["cli-errors"]
    commands = (("canary", f"{name}:{v['v2']}", "--percent", "10"), ("shadow", f"{name}:{v['v2']}", "--rate", "0.5"),
                ("promote", name, "--min-labelled", "0", "--min-agreement", "0"), ("rollback", name))
    for args in commands:
        for token in ("wrong-token", None):  # a wrong one, and none at all
            done = cli(server, *args, token=token, use_file=False)
            clean(done)
            assert done.returncode == 1 and done.stdout == "", (args, done.stdout)
            assert done.stderr.startswith(f"cnnserve: {args[0]} {args[1]}: ") and " 403 " in done.stderr, done.stderr
            assert "model control token" in done.stderr  # the server's reason, passed on
        missing = run_cli(*args, "--url", server.url, "--token-file", tmp_path / "no-such-token")
        clean(missing)
        assert missing.returncode == 2 and "no-such-token" in missing.stderr, missing.stderr
        away = run_cli(*args, "--url", "http://127.0.0.1:9", "--token-file", server.token_file, "--timeout", "10")
        clean(away)
        assert away.returncode == 1 and "cannot reach the service" in away.stderr, away.stderr
    assert monitor(server, name)["routes"] == {}  # none of them changed anything

    for kind, share_ in (("canary", ("--percent", "10")), ("shadow", ("--rate", "0.5"))):
        unknown = cli(server, kind, f"{name}:nosuchversion", *share_)
        clean(unknown)
        assert unknown.returncode == 1 and " 404 " in unknown.stderr, unknown.stderr
        assert f"model {name}:nosuchversion is not in this server's model store" in unknown.stderr
        served = cli(server, kind, f"{name}:{v['v1']}", *share_)  # the served version is no candidate
        clean(served)
        assert served.returncode == 1 and " 409 " in served.stderr and "is the version served" in served.stderr
        nameless = cli(server, kind, name, *share_)
        clean(nameless)
        assert nameless.returncode == 1 and f"400 name the candidate: '{name}':VERSION" in nameless.stderr
    nothing = cli(server, "promote", name)
    clean(nothing)
    assert nothing.returncode == 1 and "start a canary or shadow of it first" in nothing.stderr, nothing.stderr
    none_left = cli(server, "rollback", name)
    clean(none_left)
    assert none_left.returncode == 1 and " 409 " in none_left.stderr, none_left.stderr
    assert monitor(server, name)["routes"] == {}


def test_promote_names_the_failed_figures_then_promotes_and_rollback_restores(server, versions, digits):
    name, v = "cli-promote", versions["cli-promote"]
    # a candidate that swaps 3 and 5: it disagrees wherever the served version answers either
    assert cli(server, "shadow", f"{name}:{v['v3']}", "--rate", "1").returncode == 0
    answers = _labelled(server, name, 40, digits)
    differs = sum(a["predictions"][0]["label"] in ("3", "5") for a in answers)
    assert 0 < differs < 40
    _shadow_after(server, name, v["v3"], 40)
    refused = cli(server, "promote", name, "--min-labelled", "10", "--min-agreement", "0.98")
    clean(refused)
    assert refused.returncode == 1 and refused.stdout == ""
    lines = refused.stderr.splitlines()
    assert lines[0] == f"cnnserve: promote {name}: not promoted (409); failed:", refused.stderr
    failed = [line.strip() for line in lines[1:]]
    assert [f.split(":")[0] for f in failed] == ["agreement", "accuracy"], failed  # each failed figure, named
    assert f"on {1 - differs / 40:.4f} of 40 shadowed requests, below min_agreement 0.98" in failed[0], failed
    assert set(served_by(server, name, [uuid.uuid4().hex for _ in range(10)], digits)) == {v["v1"]}  # unchanged
    few = cli(server, "promote", name, "--min-labelled", "1000", "--min-agreement", "0")
    assert few.returncode == 1 and [x.strip().split(":")[0] for x in few.stderr.splitlines()[1:]] == \
        ["labelled", "accuracy"], few.stderr

    back = cli(server, "rollback", name)  # during a shadow: ends it, lets the candidate go
    assert back.returncode == 0 and back.stdout == f"rolled back {name}: serving {v['v1']}\n", back.stderr
    assert monitor(server, name)["routes"] == {}

    assert cli(server, "shadow", f"{name}:{v['v2']}", "--rate", "1").returncode == 0  # the same file: agrees
    _labelled(server, name, 20, digits)
    _shadow_after(server, name, v["v2"], 20)
    done = cli(server, "promote", name, "--min-labelled", "20")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"promoted {name}: serving {v['v2']} (was {v['v1']}, kept loaded for "
                                  "`cnnserve rollback`); agreement 1.0, labelled 20"), done.stdout
    assert set(served_by(server, name, [uuid.uuid4().hex for _ in range(10)], digits)) == {v["v2"]}
    back = cli(server, "rollback", name)
    assert back.returncode == 0 and back.stdout == f"rolled back {name}: serving {v['v1']}\n", back.stderr
    assert set(served_by(server, name, [uuid.uuid4().hex for _ in range(10)], digits)) == {v["v1"]}


def _labelled(srv, name: str, n: int, images) -> list[dict]:
    """``n`` answers of the served version, each labelled with its own answer (so the served version is right on
    every one)."""
    answers = [classify(srv, name, images[i], uuid.uuid4().hex) for i in range(n)]
    for a in answers:
        r = feedback(srv, name, a["id"], a["predictions"][0]["label"])
        assert r.status_code == 200, r.text
    return answers
