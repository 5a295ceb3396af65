"""The client side of models at runtime: ``cnnserve load``, ``cnnserve unload`` and ``cnnserve repository``
against a running service's model repository endpoints (``service/repository.py``), with the standard library
only. The control token comes from ``--token-file`` or the environment variable ``CNNSERVE_CONTROL_TOKEN``.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

TOKEN_ENV = "CNNSERVE_CONTROL_TOKEN"


class RemoteError(ValueError):
    """A refusal or failure from the service, with its status and reason."""


def call(url: str, path: str, body: dict | None = None, token: str | None = None, timeout: float = 300):
    """POST ``body`` as JSON to ``url + path``: the status and the decoded answer."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body or {}).encode(), headers=headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read()).get("error", "")
        except ValueError:
            reason = ""
        raise RemoteError(f"{url}: {e.code} {reason or e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RemoteError(f"{url}: cannot reach the service: {getattr(e, 'reason', e)}") from None


def _token(args) -> str | None:
    if args.token_file:
        with open(args.token_file) as f:
            return f.read().strip()
    return os.environ.get(TOKEN_ENV)


def _cmd_load(args) -> int:
    return _control(args, "load")


def _cmd_unload(args) -> int:
    return _control(args, "unload")


def _control(args, action: str) -> int:
    tag = urllib.parse.quote(args.tag, safe=":")
    try:
        body = {"parameters": {"default": True}} if getattr(args, "default", False) else {}
        status, answer = call(args.url, f"/v2/repository/models/{tag}/{action}", body, _token(args), args.timeout)
    except RemoteError as e:
        print(f"cnnserve: {action} {args.tag}: {e}", file=sys.stderr)
        return 1
    if status == 202:
        print(f"{action} {args.tag}: not yet in every worker; `cnnserve repository --url {args.url}` shows when "
              f"it is: {json.dumps(answer.get('pending', []))}")
    else:
        print(f"{action}ed {args.tag} on {args.url} (every worker)")
    return 0


def _rollout(args, action: str, body: dict) -> tuple[int, dict] | None:
    tag = urllib.parse.quote(args.tag, safe=":")
    try:
        return call(args.url, f"/v2/repository/models/{tag}/{action}", {"parameters": body}, _token(args),
                    args.timeout)
    except RemoteError as e:
        print(f"cnnserve: {action} {args.tag}: {e}", file=sys.stderr)
        return None


def _cmd_canary(args) -> int:
    return _start_or_end(args, "canary", "percent", args.percent,
                         f"{args.percent:g}% of the requests that name no version")


def _cmd_shadow(args) -> int:
    return _start_or_end(args, "shadow", "rate", args.rate,
                         f"{args.rate:g} of the served version's requests run on it too")


def _start_or_end(args, action: str, key: str, share: float, what: str) -> int:
    """A canary or a shadow: the same request with its share under ``key``; a share of 0 ends it."""
    done = _rollout(args, action, {key: share})
    if done is None:
        return 1
    print(f"{action} {args.tag}: {what}" + (" (ended)" if not share else "")
          + ("; not yet in every worker" if done[0] == 202 else ""))
    return 0


def _cmd_promote(args) -> int:
    tag = urllib.parse.quote(args.tag, safe=":")
    body = {"parameters": {"min_agreement": args.min_agreement, "min_labelled": args.min_labelled,
                           "min_accuracy_gain": args.min_accuracy_gain}}
    request = urllib.request.Request(args.url.rstrip("/") + f"/v2/repository/models/{tag}/promote",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {t}"} if (t := _token(args)) else {})})
    try:  # not ``call``: a refusal's body lists each failed threshold, one a line here
        with urllib.request.urlopen(request, timeout=args.timeout) as r:
            answer = json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            answer = json.loads(e.read())
        except ValueError:
            answer = {}
        if answer.get("failed"):
            print(f"cnnserve: promote {args.tag}: not promoted ({e.code}); failed:", file=sys.stderr)
            for why in answer["failed"]:
                print(f"  {why}", file=sys.stderr)
        else:
            print(f"cnnserve: promote {args.tag}: {e.code} {answer.get('error') or e.reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"cnnserve: promote {args.tag}: cannot reach the service: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    f = answer.get("figures", {})
    print(f"promoted {args.tag}: serving {answer.get('promoted', '?')} (was {answer.get('previous', '?')}, kept "
          f"loaded for `cnnserve rollback`); agreement {f.get('agreement')}, labelled {f.get('labelled')}, accuracy "
          f"{f.get('accuracy')} against {f.get('primary_accuracy')}" if f else f"promote {args.tag}: {answer}")
    return 0


def _cmd_rollback(args) -> int:
    done = _rollout(args, "rollback", {})
    if done is None:
        return 1
    print(f"rolled back {args.tag}: serving {done[1].get('serving', '?')}"
          + ("; not yet in every worker" if done[0] == 202 else ""))
    return 0


def _cmd_api_key(args) -> int:
    from cnnserve.service.apikeys import KeysFileError, new_key

    try:
        key = new_key(args.name, args.file)
    except KeysFileError as e:
        print(f"cnnserve: api-key: {e}", file=sys.stderr)
        return 1
    print(key)
    print(f"(the key of {args.name!r}, shown this once; {args.file} keeps only its SHA-256: serve with "
          f"--arg api_keys_file={args.file})", file=sys.stderr)
    return 0


def _cmd_repository(args) -> int:
    try:
        _, rows = call(args.url, "/v2/repository/index", {}, timeout=args.timeout)
    except RemoteError as e:
        print(f"cnnserve: repository: {e}", file=sys.stderr)
        return 1
    for r in rows:
        print(f"{r['name']}:{r['version']}  {r['state']}" + (f"  ({r['reason']})" if r.get("reason") else ""))
    return 0


def add_parsers(sub) -> None:
    for name, func, help_ in (
            ("load", _cmd_load, "load a stored model version into a running service, then switch to it"),
            ("unload", _cmd_unload, "stop serving a model (every version, or NAME:VERSION) in a running service")):
        p = sub.add_parser(name, help=help_, description=f"{help_[0].upper()}{help_[1:]}: the model repository "
                           "endpoint of the Open Inference Protocol; the service must run with "
                           "--arg model_control=true and a token. Answers once every worker has done it.")
        p.add_argument("tag", help="NAME:VERSION, or NAME: " + ("its newest stored version" if name == "load" else
                                                                  "every loaded version"))
        if name == "load":
            p.add_argument("--default", action="store_true", help="also make it the default model: the one requests "
                                                                  "that name no model go to")
        p.add_argument("--url", default="http://127.0.0.1:3000", help="the service (default http://127.0.0.1:3000)")
        p.add_argument("--token-file", help=f"a file holding the control token (default: ${TOKEN_ENV})")
        p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the answer (default 300)")
        p.set_defaults(func=func)
    def common(p, tag_help: str) -> None:
        p.add_argument("tag", help=tag_help)
        p.add_argument("--url", default="http://127.0.0.1:3000", help="the service (default http://127.0.0.1:3000)")
        p.add_argument("--token-file", help=f"a file holding the control token (default: ${TOKEN_ENV})")
        p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the answer (default 300)")

    rollout = ("; the service must run with --arg model_control=true and a token (docs/rollout.md). Answers once "
               "every worker has done it.")
    p = sub.add_parser("canary", help="send a share of the requests that name no version to a candidate version",
                       description="Load NAME:CANDIDATE beside the served version in every worker and send PERCENT% "
                                   "of the requests that name no version to it, chosen by a hash of the request id (a "
                                   "retry with the same X-Request-ID gets the same version); --percent 0 ends it"
                                   + rollout)
    common(p, "NAME:CANDIDATE")
    p.add_argument("--percent", type=float, required=True, help="the share, 0 to 100 (0 ends the canary)")
    p.set_defaults(func=_cmd_canary)
    p = sub.add_parser("shadow", help="run a sample of live requests on a candidate version too, and compare",
                       description="Load NAME:CANDIDATE beside the served version and run a RATE share of the served "
                                   "version's requests on it as well, after the served version answered, at bulk "
                                   "priority, dropped first under load; its answers reach no client, they are compared "
                                   "(top-1 agreement, |dp|, its latency, its accuracy on labels): /models/NAME/monitor"
                                   + rollout)
    common(p, "NAME:CANDIDATE")
    p.add_argument("--rate", type=float, required=True, help="the share, 0 to 1 (0 ends the shadow)")
    p.set_defaults(func=_cmd_shadow)
    p = sub.add_parser("promote", help="make a candidate the served version if its measured figures pass",
                       description="Make NAME:CANDIDATE (or NAME: its canary's or shadow's) the version requests get, "
                                   "only if its labelled answers, its shadow agreement and its accuracy against the "
                                   "served version's pass the thresholds; otherwise print which failed and exit 1. "
                                   "The version it replaces stays loaded for `cnnserve rollback`" + rollout)
    common(p, "NAME:CANDIDATE, or NAME for the candidate of its canary or shadow")
    p.add_argument("--min-agreement", type=float, default=0.98,
                   help="the shadow's top-1 agreement with the served version at least (default 0.98; 0: no shadow "
                        "needed)")
    p.add_argument("--min-labelled", type=int, default=200,
                   help="the candidate's labelled answers at least (default 200; 0: no labels needed)")
    p.add_argument("--min-accuracy-gain", type=float, default=0.0,
                   help="its accuracy on labels at least the served version's plus this (default 0: not worse)")
    p.set_defaults(func=_cmd_promote)
    p = sub.add_parser("rollback", help="go back to the version served before the last promote",
                       description="Serve the version the last promote replaced again (kept loaded since), or end a "
                                   "canary and shadow and let their candidate go" + rollout)
    common(p, "NAME")
    p.set_defaults(func=_cmd_rollback)
    p = sub.add_parser("api-key", help="make an API key for the inference endpoints (--arg api_keys_file)",
                       description="Make a random API key named NAME, append its SHA-256 to the keys file (made, "
                                   "readable by its owner only, if missing) and print the key once: the file never "
                                   "holds it. A running server reads the file again when it changes.")
    p.add_argument("name", help="the key's name, as metrics show callers (letters, digits, '_', '.', '-')")
    p.add_argument("--file", required=True, help="the keys file the server reads (--arg api_keys_file=FILE)")
    p.set_defaults(func=_cmd_api_key)
    p = sub.add_parser("repository", help="list the stored models and their states in a running service",
                       description="The model repository index: every stored cnnserve model version and its "
                                   "state (READY in every worker, LOADING, UNLOADING, UNAVAILABLE with the reason).")
    p.add_argument("--url", default="http://127.0.0.1:3000", help="the service (default http://127.0.0.1:3000)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the answer (default 60)")
    p.set_defaults(func=_cmd_repository)
