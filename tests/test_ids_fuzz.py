"""Request ids searched with hypothesis against one real two-worker server under a memory cap: HTTP's X-Request-ID
(any bytes a header may carry, and some it may not), gRPC's x-request-id metadata beside arbitrary other metadata
(binary ``-bin`` keys too), and feedback's id (any string). service/telemetry.py keeps a client's id when it is
sane and makes one (32 hex digits) otherwise; feedback joins labels on those ids.

Invariants, after every example:
- every answer arrives (no dropped connection), is 2xx or 4xx (never 5xx) and is JSON; a 4xx is the service's
  ``{"error", "code", "request_id"}``;
- it carries exactly one id: the one sent when that is sane (``sane`` below, written from the definition, not
  from the service's code), else 32 hex digits made by the server; with several ids sent, one of the sane ones
  or a made one;
- the Open Inference Protocol's body ``id`` (none asked) and an error body's ``request_id`` are the header's;
- gRPC: the initial metadata's id likewise, and a refusal's trailing metadata names the same id; the status is
  OK or a deliberate refusal, never INTERNAL or UNKNOWN;
- feedback for an arbitrary id answers 404 (no such answer) or 400 (not an id), JSON; for an answered one 200;
- no id sent ever shows in /metrics (labels there are model, version, class: never per request).

Header values with control characters (not legal in HTTP) are refused by the HTTP parser itself before the
service runs: they must get a 400 and a closed connection, not a dropped one (``test_an_illegal_header_...``
says what they still lack)."""

from __future__ import annotations

import json
import re
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from cnnserve.core.grpc_proto import path, pb
from tests.support.hostile import raw_http as http

from .conftest import Server, encode

pytestmark = pytest.mark.slow
CAP_MB = 6144  # per process of the server, as the other fuzz tests: hostile input fails there, not on the machine
MODEL = "lenet5-digits"
EXAMPLES = 100
HEX32 = re.compile(r"[0-9a-f]{32}")
SENT: set[str] = set()  # every id the tests sent, for the /metrics check at the end
ANSWERED: set[str] = set()  # the ids of the answers the tests got, which feedback finds (the ring keeps 10,000)


def sane(value: str) -> bool:
    """What a client may choose as its request id: 1 to 128 characters, each visible ASCII (``!`` to ``~``), none a
    double quote or a backslash."""
    return 1 <= len(value) <= 128 and all("!" <= c <= "~" and c not in '"\\' for c in value)


@pytest.fixture(scope="module")
def srv(stored_default):
    assert stored_default.split(":")[0] == MODEL
    # model_sync_s: feedback for an unknown id waits two of them for the other worker's flush
    s = Server("--arg", f"models={stored_default}", "--arg", "workers=2", "--arg", "model_sync_s=0.1",
               memory_limit_mb=CAP_MB)
    yield s
    s.stop()


# -- HTTP --------------------------------------------------------------------------------------------------------

DIGIT = encode(np.full((28, 28), 200, np.uint8))
V2_BODY = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                  "data": [0] * 784}]}).encode()
REQUESTS = {  # what an example sends its ids with: (method, path, content type, body)
    "classify": ("POST", f"/classify?model={MODEL}", "image/png", DIGIT),
    "classify, not an image": ("POST", f"/classify?model={MODEL}", "image/png", b"not an image"),
    "v2 infer": ("POST", f"/v2/models/{MODEL}/infer", "application/json", V2_BODY),
    "v2 infer, bad JSON": ("POST", f"/v2/models/{MODEL}/infer", "application/json", b"{"),
    "no such route": ("GET", "/no/such/route", None, b""),
    # refused before the answer is looked for (which waits for the other worker's flush, 0.7 s here)
    "feedback, bad label": ("POST", f"/v2/models/{MODEL}/feedback", "application/json",
                            json.dumps({"id": "never-answered", "label": "not-a-class"}).encode()),
}
# RFC 9110 field-value octets: visible ASCII, space, tab, and obs-text (0x80-0xFF, which servers read as Latin-1)
FIELD_OCTETS = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]
CONTROL_OCTETS = [c for c in range(0x20) if c not in (9, 10, 13)] + [0x7F]  # not allowed in a field value


FIELD = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=130).map(str.encode),
    st.lists(st.sampled_from(FIELD_OCTETS), max_size=140).map(bytes),
    st.sampled_from([b"x" * 128, b"x" * 129, b'"quoted"', b"back\\slash", b"\xff\xfe", b"\tlead", b" lead", b"",
                     b"trail ", b" both\t"]),
)
ILLEGAL = st.tuples(FIELD, st.sampled_from(CONTROL_OCTETS), FIELD).map(lambda t: t[0] + bytes([t[1]]) + t[2])


def check_http_answer(status: int, fields: list, body: bytes, sent: list[str]) -> list[str]:
    """What is wrong with one answer to a request that sent the ids ``sent`` (as the server reads them)."""
    problems = []
    if not (200 <= status < 300 or 400 <= status < 500):
        problems.append(f"status {status}: {body[:200]!r}")
    ids = [v.decode("latin-1") for k, v in fields if k == b"x-request-id"]
    if len(ids) != 1:
        return [*problems, f"{len(ids)} X-Request-ID headers: {ids}"]
    got = ids[0]
    sane_sent = [s for s in sent if sane(s)]
    if len(sent) == 1 and sane_sent:
        if got != sent[0]:
            problems.append(f"a sane id {sent[0]!r} answered as {got!r}")
    elif got not in sane_sent and not HEX32.fullmatch(got):
        problems.append(f"id {got!r} is neither a sane one sent ({sane_sent}) nor made by the server")
    if len(sent) == 1 and not sane_sent and not HEX32.fullmatch(got):
        problems.append(f"an insane id {sent[0]!r} answered as {got!r}")
    try:
        doc = json.loads(body)
    except ValueError:
        return [*problems, f"not JSON: {body[:200]!r}"]
    if status >= 400 and not (isinstance(doc, dict) and {"error", "code", "request_id"} <= set(doc)):
        problems.append(f"a {status} that is not the service's JSON error: {body[:200]!r}")
    if isinstance(doc, dict) and "request_id" in doc and doc["request_id"] != got:
        problems.append(f"body's request_id {doc['request_id']!r} is not the header's {got!r}")
    if isinstance(doc, dict) and "model_name" in doc and doc.get("id") != got:  # a v2 answer, no id asked
        problems.append(f"v2 body's id {doc.get('id')!r} is not the header's {got!r}")
    return problems


def test_http_request_ids(srv):
    """Any X-Request-ID value (or none, or several) on a success, a refusal, an unknown route and feedback."""
    problems: list = []
    seen: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(what=st.sampled_from(sorted(REQUESTS)), values=st.lists(FIELD, max_size=3),
           name=st.sampled_from([b"X-Request-ID", b"x-request-id", b"X-REQUEST-ID"]))
    @example(what="classify", values=[b"client-id_0123.ABC:xyz"], name=b"X-Request-ID")
    @example(what="v2 infer", values=[b"x" * 128], name=b"X-Request-ID")
    @example(what="v2 infer", values=[b"x" * 129], name=b"X-Request-ID")
    @example(what="no such route", values=[b'a"b'], name=b"X-Request-ID")
    @example(what="classify, not an image", values=[b"a\\b"], name=b"X-Request-ID")
    @example(what="feedback, bad label", values=[b"\xc3\xbc-nicode"], name=b"X-Request-ID")
    @example(what="v2 infer", values=[b"first", b"second"], name=b"X-Request-ID")
    def check(what, values, name):
        method, target, ctype, body = REQUESTS[what]
        headers = [(b"Content-Type", ctype.encode())] if ctype else []
        headers += [(name, v) for v in values]
        sent = [v.strip(b" \t").decode("latin-1") for v in values]  # a header's value, as RFC 9110 reads it
        SENT.update(sent)
        try:
            status, fields, answer = http(srv, method, target, headers, body)
        except (AssertionError, OSError) as e:
            problems.append((what, values, f"{type(e).__name__}: {e}"))
            return
        seen[f"{what} {status}"] = seen.get(f"{what} {status}", 0) + 1
        if status == 200:
            ANSWERED.update(v.decode("latin-1") for k, v in fields if k == b"x-request-id")
        problems.extend((what, values, p) for p in check_http_answer(status, fields, answer, sent))

    check()
    assert not problems, (len(problems), problems[:10])
    assert seen.get("classify 200") and seen.get("v2 infer 200") and seen.get("no such route 404"), seen
    assert seen.get("feedback, bad label 400") and seen.get("classify, not an image 400"), seen


def test_an_illegal_header_value_gets_a_400_and_a_closed_connection(srv):
    """A control character in a header value is no HTTP: the parser refuses the request before the service sees
    it. The client still gets a 400, never a dropped connection or a 5xx."""
    problems: list = []

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(value=ILLEGAL, what=st.sampled_from(sorted(REQUESTS)))
    @example(value=b"a\x00b", what="classify")
    @example(value=b"\x1b[31mred", what="v2 infer")
    def check(value, what):
        method, target, ctype, body = REQUESTS[what]
        try:
            status, _, answer = http(srv, method, target, [(b"X-Request-ID", value)], body)
        except (AssertionError, OSError) as e:
            problems.append((value, f"{type(e).__name__}: {e}"))
            return
        if status != 400:
            problems.append((value, status, answer[:200]))

    check()
    assert not problems, problems[:10]


def test_an_illegal_header_value_gets_the_services_json_error(srv):
    status, fields, body = http(srv, "GET", "/no/such/route", [(b"X-Request-ID", b"a\x01b")])
    assert check_http_answer(status, fields, body, ["a\x01b"]) == []


def test_trailing_whitespace_is_not_part_of_the_id(srv):
    status, fields, body = http(srv, "GET", "/no/such/route", [(b"X-Request-ID", b"client-id ")])
    assert check_http_answer(status, fields, body, ["client-id"]) == []


# -- gRPC --------------------------------------------------------------------------------------------------------

ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=140)  # what gRPC's client sends
KEYS = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,19}", fullmatch=True).filter(
    lambda k: not k.startswith("grpc-") and k not in ("x-request-id", "te", "content-type", "user-agent", "host")
    and not k.endswith("-bin"))
OTHER = st.one_of(st.tuples(KEYS, ASCII), st.tuples(KEYS.map(lambda k: k + "-bin"), st.binary(max_size=64)),
                  st.tuples(st.just("x-request-id-bin"), st.binary(max_size=64)))  # not the id: a key of its own


def infer_request(model: str) -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="pixels", datatype="UINT8", shape=[1, 1, 28, 28])
    req.raw_input_contents.append(bytes(784))
    return req.SerializeToString()


def test_grpc_request_ids(srv):
    """ModelInfer with any x-request-id metadata values (gRPC's client allows printable ASCII in text metadata;
    none, one or several of them) beside other text and binary metadata, answered or refused (unknown model)."""
    problems: list = []
    seen: dict[str, int] = {}
    channel = grpc.insecure_channel(srv.grpc_target)
    infer = channel.unary_unary(path("ModelInfer"))

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(ids=st.lists(ASCII, max_size=3), other=st.lists(OTHER, max_size=4), known=st.booleans())
    @example(ids=["grpc-id-1"], other=[], known=True)
    @example(ids=["x" * 129], other=[], known=True)
    @example(ids=[" padded "], other=[], known=True)
    @example(ids=['q"uote'], other=[("x-request-id-bin", b"\xff\x00")], known=False)
    @example(ids=[], other=[("trace-bin", bytes(range(256))[:64])], known=True)
    def check(ids, other, known):
        metadata = [("x-request-id", v) for v in ids] + list(other)
        SENT.update(ids)
        try:
            _, call = infer.with_call(infer_request(MODEL if known else "no-such-model"), metadata=metadata,
                                      timeout=30)
            status, trailing = "OK", None
        except grpc.RpcError as e:
            call, status = e, e.code().name
            trailing = [v for k, v in e.trailing_metadata() or () if k == "x-request-id"]
        seen[status] = seen.get(status, 0) + 1
        what = (ids, other, known, status)
        if status not in ("OK", "NOT_FOUND"):
            problems.append(("status", what, call.details() if status != "OK" else ""))
            return
        initial = [v for k, v in call.initial_metadata() or () if k == "x-request-id"]
        if len(initial) != 1:
            problems.append(("initial ids", initial, what))
            return
        read = [v.strip(" \t") for v in ids]  # a value less the whitespace around it, as HTTP reads one
        got, sane_sent = initial[0], [v for v in read if sane(v)]
        if len(ids) == 1 and sane_sent and got != read[0]:
            problems.append(("a sane id not kept", got, what))
        elif not (len(ids) == 1 and sane_sent) and got not in sane_sent and not HEX32.fullmatch(got):
            problems.append(("an id neither sent sane nor made", got, what))
        if len(ids) == 1 and not sane_sent and not HEX32.fullmatch(got):
            problems.append(("an insane id kept", got, what))
        if status == "OK":
            ANSWERED.add(got)
        if trailing is not None and trailing != [got]:
            problems.append(("trailing id", trailing, got, what))

    try:
        check()
    finally:
        channel.close()
    assert not problems, (len(problems), problems[:10])
    assert seen.get("OK") and seen.get("NOT_FOUND"), seen


# -- feedback ----------------------------------------------------------------------------------------------------

def feedback(srv, rid, label="3") -> tuple[int, dict | None]:
    body = json.dumps({"id": rid, "label": label}).encode()  # ensure_ascii: a lone surrogate travels as \udxxx
    status, fields, answer = http(srv, "POST", f"/v2/models/{MODEL}/feedback",
                                  [(b"Content-Type", b"application/json")], body)
    try:
        return status, json.loads(answer)
    except ValueError:
        return status, None


def test_feedback_for_any_id(srv):
    """An arbitrary string as feedback's id: 404 JSON (no such answer) or 400 JSON (not an id), never 5xx; an id a
    client chose and got answered under (drawn sane): 200, naming the served version."""
    problems: list = []

    # fewer: each unknown id waits for the other worker's flush (0.7 s here)
    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(rid=st.text(max_size=140) | st.sampled_from(["", "x" * 128, "x" * 129, "a\x00b", "💥" * 40]),
           answered=st.booleans())
    @example(rid="answered-id-1", answered=True)
    @example(rid="", answered=False)
    def check(rid, answered):
        SENT.add(rid)
        if answered and sane(rid):  # answered under that id first: then the label must find it
            status, fields, _ = http(srv, "POST", f"/classify?model={MODEL}",
                                     [(b"Content-Type", b"image/png"), (b"X-Request-ID", rid.encode())], DIGIT)
            assert status == 200 and (b"x-request-id", rid.encode()) in fields, (status, fields)
            ANSWERED.add(rid)
        try:
            status, doc = feedback(srv, rid)
        except (AssertionError, OSError) as e:
            problems.append((rid, f"{type(e).__name__}: {e}"))
            return
        expected = {200} if rid in ANSWERED else {404} if sane(rid) else {400}  # no answer carries an insane id
        if status not in expected or not isinstance(doc, dict):
            problems.append((rid, answered, status, doc))
        elif status != 200 and not {"error", "code", "request_id"} <= set(doc):
            problems.append((rid, "not the service's JSON error", doc))

    check()
    assert not problems, (len(problems), problems[:10])


def test_feedback_for_an_id_with_a_lone_surrogate(srv):
    """JSON may carry any code point, lone surrogates too (hypothesis's text leaves them out, so the search above
    does not reach this)."""
    status, doc = feedback(srv, "\udcff-lone-surrogate")
    assert status == 400 and isinstance(doc, dict) and doc.get("code") == "bad_id", doc


def test_no_id_shows_in_metrics(srv):
    """After the searches above (and a wait for the gauges each worker sets every 5 s from the rollout file, which
    the labelled answers above made), no id that was sent is in a label of /metrics: labels there are models,
    versions and classes, never requests. Ids shorter than 6 characters are left out (``0`` is a class)."""
    assert SENT, "run with the tests above"
    time.sleep(6)
    status, _, metrics = http(srv, "GET", "/metrics", [])
    assert status == 200
    text = metrics.decode("utf-8", "replace")
    assert "cnnserve_feedback_labelled{" in text  # the gauges that name what feedback labelled are there
    values = {m.group(1).replace('\\"', '"').replace("\\\\", "\\")
              for m in re.finditer(r'="((?:[^"\\]|\\.)*)"', text)}
    found = [rid for rid in SENT if len(rid) >= 6 and any(rid in v for v in values)]
    assert not found, found[:20]
