"""The model control plane as a state machine: hypothesis drives one real two-worker server through loads,
unloads, default changes, bad models, malformed names, pairs of calls at the same instant (on two workers, or
one) and a worker killed with -9 (idle, or while a load is under way), keeps a model of what the server must
serve, and checks after every step that the workers' reports, the index, and on a connection to each worker
``/models`` and requests (one without a model, one naming each stored version) agree with it.

What the model holds (the contract of ``docs/runtime.md``, "Models at runtime"):

- the served set: every model's loaded versions, oldest to newest, the newest ``keep_versions`` (2) kept; it
  is never empty (an unload that would empty it is 409, decided once for the whole server, also when two
  unloads race on two connections);
- the default: the operator's choice (the first of ``--arg models=``, or the last load with
  ``{"parameters": {"default": true}}``); unloading it is allowed, and then a request without a model gets
  a 4xx ``default_unavailable`` until it is loaded again or another default is set;
- names are the store's (``LENET5-DIGITS`` is ``lenet5-digits``); malformed tags are 400, unknown ones 404;
  a damaged stored model or one whose metadata names 5 labels for 10 outputs is a 4xx that changes nothing;
- a control call answers 200 only once every worker applied it; nothing ever answers 5xx.

The server is shared by every example (starting one costs seconds): each example first brings it back to
its start-up set, and the checks poll (the workers converge every ``model_sync_s``) rather than sleep.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from tests.conftest import Server, encode

pytestmark = pytest.mark.slow
NAME, OTHER = "lenet5-digits", "digits-c"  # the default model's name, and a second one
TOKEN = "test-token-states"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEEP = 2  # keep_versions
SYNC_S = 0.1  # model_sync_s: the workers look at the shared set ten times a second
CONVERGE_S = 20.0  # how long a busy two-core machine may take to show a change everywhere (polled)
RESPAWN_S = 120.0  # a worker killed with -9 back and serving the shared set
CAP_MB = 6144  # per process, as tests/test_reliability.py: a worker with onnxruntime maps about 2 GB
STEPS: collections.Counter = collections.Counter()  # what the examples did, for the summary
ANY_4XX = frozenset(range(400, 500))
# No shrinking unless asked for: each replay is seconds of a real server, a race may not fail again on replay
# (hypothesis then spends its five minutes), and an example is at most 8 steps, printed as it ran.
PHASES = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if os.environ.get("CNNSERVE_TEST_SHRINK") else ())


# -- the stored models ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Universe:
    good: dict  # name -> its good stored versions, oldest first (the last is what a load without version gets)
    bad: dict  # "damaged" / "labels" -> a stored version of NAME that no worker can serve

    def newest(self, name: str) -> str:
        return self.good[name][-1]


def _store_unchecked(path, name: str) -> str:
    """A file put into the store past ``cnnserve store``'s checks (as a hand or an older cnnserve would)."""
    import bentoml

    with bentoml.models.create(name, module="cnnserve") as m:
        shutil.copyfile(path, m.path_of("model.onnx"))
    return m.tag.version


@pytest.fixture(scope="module")
def universe(default_onnx, stored_default, tmp_path_factory) -> Universe:
    """Two bad versions of NAME stored first (so they are never its newest), then three good ones, and one
    version of a second name."""
    import bentoml
    import onnx

    from cnnserve.core.onnxmeta import KEY_SPEC
    from cnnserve.export.store import store_model

    folder = tmp_path_factory.mktemp("bad-models")
    damaged = folder / "damaged.onnx"
    damaged.write_bytes(b"\x08\x07 not an onnx file")
    m = onnx.load(str(default_onnx))
    prop = next(p for p in m.metadata_props if p.key == KEY_SPEC)
    prop.value = json.dumps({**json.loads(prop.value), "labels": list("abcde")})  # 5 labels, 10 outputs
    labels = folder / "labels.onnx"
    labels.write_bytes(m.SerializeToString())
    bad = {"damaged": _store_unchecked(damaged, NAME), "labels": _store_unchecked(labels, NAME)}
    good = {NAME: [store_model(default_onnx, name=NAME).tag.version for _ in range(3)],
            OTHER: [store_model(default_onnx, name=OTHER).tag.version]}
    assert bentoml.models.get(f"{NAME}:latest").tag.version == good[NAME][-1]
    return Universe(good, bad)


@pytest.fixture(scope="module")
def control_server(universe, tmp_path_factory):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text(TOKEN + "\n")
    srv = Server("--arg", f"models={NAME}:{universe.good[NAME][0]}", "--arg", "workers=2",
                 "--arg", "model_control=true", "--arg", f"control_token_file={token}",
                 "--arg", f"keep_versions={KEEP}", "--arg", f"model_sync_s={SYNC_S}",
                 "--arg", "control_wait_s=30", "--arg", "grpc_port=0", memory_limit_mb=CAP_MB)
    yield srv
    srv.stop()


# -- what the server shows -----------------------------------------------------------------------------------

def reports_of(srv) -> list[dict]:
    """The reports of the live workers (``workers/PID.json`` in the server's folder; a killed worker's file
    stays behind, and is not a worker's any more)."""
    found = []
    for path in Path(srv.home, "cnnserve-servers").glob("*/workers/*.json"):
        if not path.stem.isdigit():
            continue
        try:
            os.kill(int(path.stem), 0)
            found.append(json.loads(path.read_text()))
        except (ProcessLookupError, OSError, ValueError):
            continue
    return found


IMAGE = encode(np.full((28, 28), 128, np.uint8))  # a digit-sized grey PNG: any model here classifies it


@dataclass
class Answer:
    status_code: int
    text: str

    def json(self):
        return json.loads(self.text)

    def code(self) -> str | None:
        """An error's ``code``, None for a body that is not the service's JSON error."""
        try:
            body = self.json()
        except ValueError:
            return None
        return body.get("code") if isinstance(body, dict) else None


def send(conn: http.client.HTTPConnection, method: str, path: str, body: bytes = b"",
         headers: dict | None = None) -> Answer:
    conn.request(method, path, body=body, headers={"Content-Length": str(len(body)), **(headers or {})})
    r = conn.getresponse()
    return Answer(r.status, r.read().decode("utf-8", "replace"))


def _owner(port: int, client_port: int, pids) -> int | None:
    """The worker holding the server's end of our connection from ``client_port`` (Linux: the socket's inode in
    /proc/net/tcp, then the process that has it open)."""
    want_local, want_remote = f"0100007F:{port:04X}", f"0100007F:{client_port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            inode = next((cols[9] for cols in (line.split() for line in f)
                          if cols[1] == want_local and cols[2] == want_remote), None)
        if not inode or inode == "0":
            return None
        for pid in pids:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
                except OSError:
                    continue
    except OSError:
        return None
    return None


def connections_to_workers(srv, pids, within_s: float = 30) -> dict[int, http.client.HTTPConnection]:
    """A kept-alive connection to each of ``pids`` (the workers accept from one shared socket, whichever is
    quicker): so that a check reaches every worker, and a race puts its two calls on two workers, or one.
    Tried for a while, not a number of times: a worker just started after a kill reports its set before its
    loop is quick at accepting, and on a busy 2-core machine its sibling took 80 connections in a row."""
    found: dict[int, http.client.HTTPConnection] = {}
    deadline = time.monotonic() + within_s
    while len(found) < len(pids) and time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
        answer = send(conn, "GET", "/livez")
        owner = _owner(srv.port, conn.sock.getsockname()[1], pids) if answer.status_code == 200 else None
        if owner is not None and owner not in found:
            found[owner] = conn
        else:
            conn.close()
            time.sleep(0.02)
    return found


# -- the model of the server ---------------------------------------------------------------------------------

@dataclass
class State:
    served: dict = field(default_factory=dict)  # name -> versions, oldest to newest
    default: str = NAME

    def copy(self) -> "State":
        return State({k: list(v) for k, v in self.served.items()}, self.default)

    def pairs(self) -> set:
        return {(n, v) for n, vs in self.served.items() for v in vs}


@dataclass(frozen=True)
class Op:
    """One control call: ``action`` load or unload, the name as sent, a version (None: the newest stored, or
    every version for an unload), how the version travels ("tag": NAME:V in the path; "param": the body),
    and whether a load makes the model the default."""
    action: str
    name: str
    version: str | None = None
    via: str = "tag"
    default: bool = False

    def __str__(self) -> str:
        what = self.name + (f":{self.version}" if self.version else "")
        return f"{self.action} {what}" + (" (version in the body)" if self.via == "param" and self.version else "") \
            + (" as the default" if self.default else "")


def predict(u: Universe, state: State, op: Op) -> tuple[frozenset, State]:
    """The statuses the contract allows for ``op`` from ``state``, and the state it leaves."""
    name = op.name.lower()  # the store's names
    if name not in u.good:
        return frozenset({404}), state
    new = state.copy()
    if op.action == "load":
        version = op.version or u.newest(name)
        if name == NAME and version in u.bad.values():
            return ANY_4XX, state
        if version not in u.good[name]:
            return frozenset({404}), state
        new.served[name] = ([v for v in new.served.get(name, []) if v != version] + [version])[-KEEP:]
        if op.default:
            new.default = name
        return frozenset({200}), new
    loaded = new.served.get(name, [])
    if not loaded or (op.version and op.version not in loaded):
        return frozenset({404}), state
    left = [v for v in loaded if op.version and v != op.version]
    if left:
        new.served[name] = left
    else:
        del new.served[name]
    if not new.served:
        return frozenset({409}), state  # never empty
    return frozenset({200}), new


class ControlStates(RuleBasedStateMachine):
    """Rules change the server and the model alike; the invariant checks that they still agree."""

    def __init__(self, srv, u: Universe) -> None:
        super().__init__()
        self.srv, self.u = srv, u
        self.state = State()
        self.kills = 0

    # -- talking to the server ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                via: http.client.HTTPConnection | None = None) -> Answer:
        """One request, on ``via`` or a connection of its own (either worker may take it); never a 5xx."""
        conn = via or http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=120)
        try:
            r = send(conn, method, path, body, headers)
        finally:
            if via is None:
                conn.close()
        assert r.status_code < 500, f"{method} {path} answered {r.status_code}: {r.text[:500]}"
        return r

    def call(self, op: Op, tag: str | None = None, via=None) -> Answer:
        params: dict = {}
        path_tag = tag or op.name
        if op.version and op.via == "param":
            params["version"] = op.version
        elif op.version:
            path_tag = f"{op.name}:{op.version}"
        if op.default:
            params["default"] = True
        body = json.dumps({"parameters": params} if params else {}).encode()
        return self.request("POST", f"/v2/repository/models/{path_tag}/{op.action}", body,
                            {**AUTH, "Content-Type": "application/json"}, via)

    def classify(self, model: str | None = None, version: str | None = None, via=None) -> Answer:
        query = urlencode({k: v for k, v in (("model", model), ("version", version)) if v})
        return self.request("POST", "/classify" + (f"?{query}" if query else ""), IMAGE,
                            {"Content-Type": "image/png"}, via)

    def index(self) -> list[dict]:
        return self.request("POST", "/v2/repository/index", b"{}", {"Content-Type": "application/json"}).json()

    def note(self, kind: str, what: str) -> None:
        STEPS[kind] += 1
        print(f"  step: {what}")

    # -- waiting -----------------------------------------------------------------------------------------

    def converged(self, state: State) -> bool:
        reports = reports_of(self.srv)
        return len(reports) == 2 and all(r.get("models") == state.served for r in reports)

    def served_now(self, expected: list[State], why: str) -> State:
        """Which of ``expected`` every worker serves already (a control call answered: it must be one); else
        fail, saying whether the workers got there later or never."""
        found = next((s for s in expected if self.converged(s)), None)
        if found is not None:
            if len({s.default for s in expected if s.served == found.served}) > 1:  # the order decided the default
                default = self.request("GET", "/models").json()["default"]
                found = next((s for s in expected if s.served == found.served and s.default == default), found)
            return found
        seen, t = [(r["pid"], r.get("generation"), r.get("models")) for r in reports_of(self.srv)], time.monotonic()
        while found is None and time.monotonic() - t < CONVERGE_S:
            time.sleep(0.1)
            found = next((s for s in expected if self.converged(s)), None)
        later = f"they did {time.monotonic() - t:.1f} s later" if found else f"still not after {CONVERGE_S:.0f} s"
        pytest.fail(f"{why}, the workers (pid, generation, models) serve {seen}, not "
                    f"{' or '.join(str(s.served) for s in expected)}; {later}")

    def wait_converged(self, state: State, within: float = CONVERGE_S, why: str = "") -> None:
        deadline = time.monotonic() + within
        while not self.converged(state):
            if time.monotonic() > deadline:
                pytest.fail(f"{why or 'the workers'} did not converge on {state.served} in {within:.0f} s: "
                            f"{[(r['pid'], r.get('generation'), r.get('models')) for r in reports_of(self.srv)]}\n"
                            f"{self.srv.output()[-2000:]}")
            time.sleep(0.05)

    def answered(self, op, r: Answer, allowed: frozenset, new: State) -> None:
        """A control call's answer against the model's; a 200 means every worker applied it already."""
        assert r.status_code in allowed, f"{op}: answered {r.status_code} ({r.text[:400]}), expected " \
                                         f"{sorted(allowed) if len(allowed) < 5 else '4xx'} from {self.state}"
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = None
            assert isinstance(body, dict) and body.get("error") and body.get("code"), \
                f"{op}: {r.status_code} without a JSON reason ({{error, code}}): {r.text[:300]!r}"
        if r.status_code == 200:
            self.served_now([new], f"{op} answered 200 from {self.state.served}, but")
        self.state = new

    def control(self, op: Op) -> Answer:
        allowed, new = predict(self.u, self.state, op)
        r = self.call(op)
        self.answered(op, r, allowed, new)
        return r

    # -- rules ---------------------------------------------------------------------------------------------

    @initialize()
    def start_up_set(self) -> None:
        """Back to NAME's first version, the default, and OTHER beside it (the server outlives each example;
        two models make every unload, and a race of two, reachable in one step). In this order, so that even
        a server that ignored the default parameter would make NAME the default again (the last one left)."""
        v1, other = self.u.good[NAME][0], self.u.newest(OTHER)
        self.call(Op("load", NAME, v1, default=True))
        seen = {(n, v) for rep in reports_of(self.srv) for n, vs in rep.get("models", {}).items() for v in vs}
        for n, v in sorted(seen - {(NAME, v1)}):
            self.call(Op("unload", n, v))  # 404 where another went first: fine here
        self.call(Op("load", OTHER, other))
        self.state = State({NAME: [v1], OTHER: [other]}, NAME)
        self.wait_converged(self.state, why="bringing the server back to its start-up set")
        print(f"example: from {self.state.served}, default {self.state.default}")

    @rule(name=st.sampled_from([NAME, OTHER]), which=st.integers(0, 4), via=st.sampled_from(["tag", "param"]),
          as_default=st.booleans(), upper=st.booleans())
    def load(self, name, which, via, as_default, upper) -> None:
        """A stored version: ``which`` indexes the model's versions; 3, none named (its newest stored); 4, the
        one it serves again (none named if it serves none), which with ``as_default`` only sets the default."""
        versions = self.u.good[name]
        version = versions[which] if which < len(versions) else None
        if which == 4:
            version = (self.state.served.get(name) or [None])[-1]
        op = Op("load", name.upper() if upper else name, version, via, as_default)
        self.note("load", str(op))
        self.control(op)

    @rule(pick=st.integers(0, 7), whole=st.booleans(), upper=st.booleans())
    def unload(self, pick, whole, upper) -> None:
        """One served model (every version), or one served version of it; sometimes the last one served."""
        names = sorted(self.state.served)
        name = names[pick % len(names)]
        versions = self.state.served[name]
        op = Op("unload", name.upper() if upper else name, None if whole else versions[pick % len(versions)])
        self.note("unload", str(op))
        self.control(op)

    @rule(kind=st.sampled_from(["damaged", "labels", "name:../x", "name:a:b", "version ../../x", "unknown name",
                                "unknown version", "default 'yes'"]), action=st.sampled_from(["load", "unload"]),
          via=st.sampled_from(["tag", "param"]))
    def refused(self, kind, action, via) -> None:
        """What no worker can serve (a damaged stored file; metadata naming 5 labels for 10 outputs): a load
        is a 4xx with its reason and the index's, an unload a 404 (it is not loaded); malformed tags are 400
        (the path form: 400, or 404 where no route takes a slash), unknown ones 404, a default parameter that
        is not a boolean 400. Nothing changes."""
        self.note("refused", f"refused ({kind}): {action}")
        if kind in self.u.bad:
            op = Op(action, NAME, self.u.bad[kind], via)
            self.control(op)
            if action == "load":
                row = next((r for r in self.index() if r["version"] == self.u.bad[kind]), None)
                assert row is not None and row["state"] != "READY" and row["reason"], f"{op}: in the index: {row}"
            return
        if kind == "name:../x":
            r, allowed = self.call(Op(action, NAME), tag=f"{NAME}:..%2Fx"), frozenset({400, 404})
        elif kind == "name:a:b":
            r, allowed = self.call(Op(action, NAME), tag=f"{NAME}:a:b"), frozenset({400})
        elif kind == "version ../../x":
            r, allowed = self.call(Op(action, NAME, "../../x", "param")), frozenset({400})
        elif kind == "unknown name":
            r, allowed = self.call(Op(action, "no-such-model")), frozenset({404})
        elif kind == "default 'yes'":  # a load's parameter: the load is refused whatever ``action`` says
            r, allowed = self.request("POST", f"/v2/repository/models/{OTHER}/load",
                                      json.dumps({"parameters": {"default": "yes"}}).encode(),
                                      {**AUTH, "Content-Type": "application/json"}), frozenset({400})
        else:
            r, allowed = self.call(Op(action, NAME, "zzzzzzzzzzzzzzzz", via)), frozenset({404})
        self.answered(f"{action} ({kind})", r, allowed, self.state)

    @rule(kind=st.sampled_from(["unload+unload", "load+unload", "load+load"]), a=st.integers(0, 7),
          b=st.integers(0, 7), apart=st.booleans())
    def concurrent_pair(self, kind, a, b, apart) -> None:
        """Two control calls at the same instant on two connections, to two workers (``apart``) or to one: their
        answers and the set they leave must be those of one order or the other (never an empty set, never a
        lost update)."""
        unloads = sorted([Op("unload", n) for n in self.state.served]
                         + [Op("unload", n, v) for n, vs in self.state.served.items() for v in vs], key=str)
        loads = [Op("load", n, v, default=d) for d in (False, True) for n, vs in sorted(self.u.good.items())
                 for v in vs]
        pick = {"unload": unloads, "load": loads}
        first, second = kind.split("+")
        ops = [pick[first][a % len(pick[first])], pick[second][b % len(pick[second])]]
        self.note("concurrent", f"concurrent, {'two workers' if apart else 'one worker'}: {ops[0]} | {ops[1]}")
        conns = connections_to_workers(self.srv, sorted(r["pid"] for r in reports_of(self.srv)))
        if apart:
            assert len(conns) == 2, f"no connection to each worker: {sorted(conns)}"
            via = list(conns.values())
        else:
            one = next(iter(conns.values()))
            other = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=120)
            for _ in range(80):  # a second connection to the same worker
                send(other, "GET", "/livez")
                if _owner(self.srv.port, other.sock.getsockname()[1], conns) == next(iter(conns)):
                    break
                other.close()
                other = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=120)
            via = [one, other]
        barrier, answers, errors = threading.Barrier(2), [None, None], []

        def one_call(i: int) -> None:
            try:
                barrier.wait(10)
                answers[i] = self.call(ops[i], via=via[i])
            except BaseException as e:  # noqa: BLE001 - raised again below, in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=one_call, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        for conn in [*conns.values(), *via]:
            conn.close()
        if errors:
            raise errors[0]
        statuses = [r.status_code for r in answers]
        orders = []
        for order in ((0, 1), (1, 0)):
            state, allowed = self.state, [None, None]
            for i in order:
                allowed[i], state = predict(self.u, state, ops[i])
            if all(s in ok for s, ok in zip(statuses, allowed)):
                orders.append(state)
        assert orders, f"{ops[0]} | {ops[1]} from {self.state}: answered {statuses} " \
                       f"({answers[0].text[:200]} | {answers[1].text[:200]}), which no order of the two gives"
        # both answered: every worker has applied both already
        self.state = self.served_now(orders, f"{ops[0]} | {ops[1]} from {self.state.served} answered {statuses}, but")

    @precondition(lambda self: self.kills < 1)
    @rule(during=st.sampled_from(["nothing", "a load it answers", "a load the other answers"]),
          which=st.integers(0, 2))
    def kill_a_worker(self, during, which) -> None:
        """kill -9 of one worker, idle or while a load (of NAME's version ``which``) is under way: the server
        starts another, which serves the shared set and its default. A load the other worker answers still
        answers 200 once the new worker has it (202 past control_wait_s); one whose worker dies gets no answer,
        and leaves the set as it was or loaded, never anything else."""
        pids = sorted(r["pid"] for r in reports_of(self.srv))
        op = Op("load", NAME, self.u.good[NAME][which])
        allowed, loaded = predict(self.u, self.state, op)
        candidates = [self.state]
        answers, errors, thread, conns = [], [], None, {}
        if during == "nothing":
            victim = pids[0]
        else:
            conns = connections_to_workers(self.srv, pids)
            assert len(conns) == 2, f"no connection to each worker {pids}: {sorted(conns)}"
            answering = pids[0]
            victim = answering if during == "a load it answers" else pids[1]
            candidates = [loaded, self.state] if during == "a load it answers" else [loaded]

            def load() -> None:
                try:
                    answers.append(self.call(op, via=conns[answering]))
                except BaseException as e:  # noqa: BLE001 - its worker died (no answer), or raised below
                    errors.append(e)

            thread = threading.Thread(target=load)
            thread.start()
            time.sleep(0.2)  # under way (a load takes a trial process and a warm-up: seconds here)
        self.note("kill", f"kill -9 worker {victim} during {during}" + ("" if during == "nothing" else f" ({op})"))
        self.kills += 1
        os.kill(victim, signal.SIGKILL)
        t = time.monotonic()
        if thread is not None:
            thread.join(180)
            for conn in conns.values():
                conn.close()
            for e in errors:
                if not isinstance(e, (OSError, http.client.HTTPException)):
                    raise e
            if during == "a load the other answers":
                assert answers and answers[0].status_code in (200, 202), \
                    f"{op}, its sibling killed: {answers[0].status_code if answers else errors}"
                if answers[0].status_code == 202:
                    print(f"    {op} answered 202")
            elif answers:  # answered before its worker died
                assert answers[0].status_code in allowed, f"{op}: {answers[0].status_code} {answers[0].text[:300]}"
                candidates = [loaded]
        deadline = t + RESPAWN_S
        while True:
            reports = reports_of(self.srv)
            if len(reports) == 2 and victim not in {r["pid"] for r in reports}:
                found = next((c for c in candidates if all(r.get("models") == c.served for r in reports)), None)
                if found is not None:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"no worker came back serving {' or '.join(str(c.served) for c in candidates)} in "
                            f"{RESPAWN_S:.0f} s: {reports}\n{self.srv.output()[-3000:]}")
            time.sleep(0.2)
        self.state = found
        print(f"    back in {time.monotonic() - t:.1f} s, serving {found.served}")

    # -- what must hold after every step --------------------------------------------------------------------

    @invariant()
    def agrees(self) -> None:
        """Every worker reports the set; the index says READY for exactly it; and on a connection to each
        worker, /models names the set and the default, every stored version answers where it is READY (else
        404), and a request without a model reaches the default's newest version, or 4xx
        default_unavailable where the default is unloaded (never another model)."""
        self.wait_converged(self.state)
        ready = {(r["name"], r["version"]) for r in self.index() if r["state"] == "READY"}
        assert ready == self.state.pairs(), f"the index says READY for {sorted(ready)}; served: {self.state.served}"
        pids = sorted(r["pid"] for r in reports_of(self.srv))
        conns = connections_to_workers(self.srv, pids)
        assert len(conns) == 2, f"no connection to each worker {pids}: {sorted(conns)}"
        try:
            for pid, conn in sorted(conns.items()):
                self.worker_agrees(pid, conn, ready)
        finally:
            for conn in conns.values():
                conn.close()

    def worker_agrees(self, pid: int, conn, ready: set) -> None:
        listed = self.request("GET", "/models", via=conn).json()
        assert listed["loaded"] == self.state.served and listed["default"] == self.state.default, \
            f"worker {pid}: /models says loaded {listed['loaded']}, default {listed['default']}; expected {self.state}"
        for n, versions in sorted(self.u.good.items()):
            for v in versions:
                r = self.classify(n, v, via=conn)
                if (n, v) in ready:
                    assert r.status_code == 200 and r.json()["version"] == v, f"worker {pid}: {n}:{v}: {r.text[:300]}"
                else:
                    assert r.status_code == 404, f"worker {pid}: {n}:{v} is not READY but answered " \
                                                 f"{r.status_code}: {r.text[:300]}"
        r = self.classify(via=conn)
        if self.state.default in self.state.served:
            assert r.status_code == 200, f"worker {pid}, no model named: {r.status_code} {r.text[:300]}; {self.state}"
            got = (r.json()["model"], r.json()["version"])
            assert got == (self.state.default, self.state.served[self.state.default][-1]), \
                f"worker {pid}: a request without a model got {got}; the default is {self.state}"
        else:
            assert 400 <= r.status_code < 500 and r.code() == "default_unavailable", \
                f"worker {pid}: the default {self.state.default} is unloaded ({self.state.served}): a request " \
                f"without a model answered {r.status_code} {r.text[:300]}"


def test_a_worker_that_skips_a_generation_serves_every_version_of_the_set(default_onnx):
    """Two loads at once on two workers (v3 through this one, v2 through the other) leave the set [v2, v3];
    this worker, serving [v1, v3] after its own load, may read that set without the one in between. It must
    end serving [v2, v3]. The state machine met it on a real server (both calls 200, one worker serving v3
    alone); here it is in one process, deterministically."""
    from cnnserve.core.config import Settings
    from cnnserve.core.runtime import load_model
    from cnnserve.service.engine import Engine
    from cnnserve.service.workers import converge

    config = Settings(providers="cpu", precision="fp32", max_batch_size=8, keep_versions=2)
    engine = Engine([load_model(default_onnx, name=NAME, version="v1", providers="cpu", batch_sizes=(1, 8))], config)
    try:
        engine.registry.load(NAME, "v3", str(default_onnx))  # this worker's own control request
        since = time.monotonic()
        failures = converge(engine.registry, {"generation": 2, "default": NAME, "models": {NAME: ["v2", "v3"]}},
                            lambda name, version: str(default_onnx), since)
        assert failures == {} and engine.registry.loaded() == {NAME: ["v2", "v3"]}
    finally:
        engine.close()


def test_the_control_plane_keeps_its_contract(control_server, universe):
    STEPS.clear()
    t = time.monotonic()
    try:
        run_state_machine_as_test(lambda: ControlStates(control_server, universe), settings=settings(
            max_examples=8, stateful_step_count=8, deadline=None, derandomize=True, database=None,
            phases=PHASES, suppress_health_check=list(HealthCheck),
            print_blob=False))
    finally:
        print(f"control states: {sum(STEPS.values())} steps in {time.monotonic() - t:.0f} s: "
              + ", ".join(f"{k} {n}" for k, n in sorted(STEPS.items())))
