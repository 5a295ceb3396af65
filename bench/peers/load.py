"""The section's load: ``wrk`` (the C load generator, sharing the cores with the servers) POSTing Open Inference
Protocol infer requests of one image each, round-robin over the workload's first images, made once per request
kind (``base.KINDS``): JSON tensors, the binary tensor extension, base64 encoded images in a BYTES input, and
cnnserve's ``/classify`` with the image as the body. Every server is sent the very same bytes for a kind."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .peer_model import IMAGE, INPUT, OUTPUT, decode

#: wrk's script: the request list (content type, JSON header length or "-", body file per line), round-robin;
#: answers other than 200 counted in Lua; one line of figures at the end (one Lua state per wrk thread).
WRK_SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  bad, i, reqs = 0, 0, {}
  local path = os.getenv("PEERS_PATH")
  for line in io.lines(os.getenv("PEERS_BODIES")) do
    local ctype, hlen, file = line:match("^(%S+) (%S+) (.+)$")
    local f = assert(io.open(file, "rb"))
    local headers = {["Content-Type"] = ctype}
    if hlen ~= "-" then headers["Inference-Header-Content-Length"] = hlen end
    reqs[#reqs + 1] = wrk.format("POST", path, headers, f:read("*a"))
    f:close()
  end
end
function request() i = i % #reqs + 1; return reqs[i] end
function response(status, headers, body) if status ~= 200 then bad = bad + 1 end end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do b = b + t:get("bad") end
  local e = summary.errors
  io.write(string.format("PEERS %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max, b, e.connect + e.read + e.write + e.timeout))
end
"""


def bodies(images: list[Path], shape: tuple[int, int, int], folder: Path, kinds=("json", "binary", "image",
                                                                                   "classify")) -> dict[str, Path]:
    """Each kind's request list for wrk (and the bodies it names), from the same images."""
    c, h, w = shape
    folder.mkdir(parents=True, exist_ok=True)
    lists = {k: [] for k in kinds}
    wanted = [{"name": OUTPUT}]
    for i, path in enumerate(images):
        data = path.read_bytes()
        pixels = decode(data, c, h, w)
        made = {
            "json": ("application/json", None, json.dumps({"inputs": [{
                "name": INPUT, "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}],
                "outputs": wanted}).encode()),
            "image": ("application/json", None, json.dumps({"inputs": [{
                "name": IMAGE, "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}],
                "outputs": wanted}).encode()),
            "classify": ("image/png" if path.suffix == ".png" else "image/jpeg", None, data),
        }
        head = json.dumps({"inputs": [{"name": INPUT, "datatype": "UINT8", "shape": list(pixels.shape),
                                       "parameters": {"binary_data_size": pixels.nbytes}}],
                           "outputs": wanted}).encode()
        made["binary"] = ("application/octet-stream", len(head), head + pixels.tobytes())
        for k in kinds:
            ctype, hlen, body = made[k]
            f = folder / f"{k}-{i:03d}.bin"
            f.write_bytes(body)
            lists[k].append(f"{ctype} {hlen if hlen is not None else '-'} {f}\n")
    out = {}
    for k, lines in lists.items():
        out[k] = folder / f"{k}.txt"
        out[k].write_text("".join(lines))
    return out


def wrk(url: str, path: str, request_list: Path, concurrency: int, duration: float, threads: int | None = None,
        timeout_s: float = 10) -> dict:
    """One wrk run: req/s, p50/p99/max in ms, answers other than 200 and socket errors."""
    exe = shutil.which("wrk")
    if not exe:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    threads = threads or max(1, min(os.cpu_count() or 1, concurrency))
    try:
        proc = subprocess.run([exe, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
                               "--timeout", f"{timeout_s:.0f}s", "-s", f.name, url], capture_output=True, text=True,
                              timeout=duration + 60, env={**os.environ, "PEERS_BODIES": str(request_list),
                                                          "PEERS_PATH": path})
    finally:
        os.unlink(f.name)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PEERS ")), None)
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"wrk failed: {proc.stderr[-500:]} {proc.stdout[-500:]}")
    n, us, p50, p99, top, bad, sock = map(int, line.split()[1:])
    return {"concurrency": concurrency, "requests": n, "duration_s": us / 1e6,
            "throughput_rps": n / (us / 1e6) if us else 0.0, "p50_ms": p50 / 1000, "p99_ms": p99 / 1000,
            "max_ms": top / 1000, "non_200": bad, "socket_errors": sock}
