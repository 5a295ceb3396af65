"""The suite's ports (tests/support/server.py:free_port): no port is handed out twice, across processes.

BentoML's HTTP socket and gRPC's workers bind with SO_REUSEPORT, so two servers given one port both bind it and
each answers half the other's connections: a port must go to one server only, whichever pytest worker drew it."""

from __future__ import annotations

import subprocess
import sys

from tests.support.server import ROOT

DRAWS = "from tests.support.server import free_port\nprint(*[free_port(then_free=i % 2) for i in range(150)])"


def test_ports_are_handed_out_once_across_processes():
    # four processes drawing at once, as pytest's workers and the harness do: 600 draws from about 12,000 ports
    # would repeat one almost surely (birthday bound) if draws were not reserved
    procs = [subprocess.Popen([sys.executable, "-c", DRAWS], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ports = [int(x) for out in outs for x in out.split()]
    assert len(ports) == 600
    # a pair (then_free=1) takes its next port too
    taken = ports + [p + 1 for i, p in enumerate(ports) if i % 150 % 2]
    assert len(set(taken)) == len(taken)
