"""PEERS, NOT CNNSERVE: the servers users of this field would pick instead of cnnserve, each serving the same
``model.onnx`` with onnxruntime and its own batching, for ``cnnserve bench --sections peers``.

Triton (PyTriton), KServe's Python model server, Ray Serve and Seldon's MLServer are installed on first use,
each into a virtual environment of its own under the harness's work folder (``<work>/peers/<name>-venv``, kept
between runs), at the versions of ``pins.py``; none becomes a dependency of cnnserve. ``<name>_peer.py`` says how a
peer is started and with which settings, ``<name>_serve.py`` is the server script that runs in its environment
(it imports nothing of this repository), ``load.py`` drives ``wrk`` with Open Inference Protocol bodies,
``section.py`` runs the section and ``report.py`` writes its Markdown and PNG.
"""
