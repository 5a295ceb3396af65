"""What the tests run against, shared with the benchmark harness of the checkout (``bench/``): a real
``bentoml serve`` on loopback (server.py), the process tree's workers and memory and the fault trials under
load (faults.py), and generated hostile inputs (hostile.py). Not part of the product: the wheel carries
neither this nor ``bench/``, and nothing under ``cnnserve.*`` imports it.
"""
