"""Triton's gRPC protocol (``inference.GRPCInferenceService``, the Open Inference Protocol over gRPC) as
message classes, for the gRPC server (``service/grpc_server.py``) and the batch scorer's ``grpc`` engine.

Where the messages come from: ``grpc_descriptors.py`` holds Triton's ``grpc_service.proto`` and
``model_config.proto`` as serialized descriptors, copied from the modules generated from them that
``tritonclient[grpc]`` ships (so the server speaks exactly what ``tritonclient.grpc`` sends, field for
field). Why not import ``tritonclient.grpc`` in the server: importing one of its modules imports the
whole client package, with ml_dtypes and python-rapidjson (32 MB installed, 0.3 s at import) that the
serving image would carry for nothing. Why not generate the modules with grpcio-tools: the descriptors
are what generated modules hold anyway, and a copy of tritonclient's cannot drift from the client the
tests speak with (``tests/test_grpc.py`` compares them with the installed tritonclient's).

The messages are built in a **private descriptor pool**, not protobuf's default one: kserve's and
tritonclient's generated modules both register the ``inference`` package in the default pool and
cannot be imported into one process (kserve#3099); this module can be imported beside either.

Regenerate after a tritonclient upgrade (the test says when): ``python -m cnnserve.core.grpc_proto --write``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from google.protobuf import descriptor_pool, message_factory

from . import grpc_descriptors

SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"


def _pool() -> descriptor_pool.DescriptorPool:
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    pool = descriptor_pool.DescriptorPool()
    # health and reflection too, so that reflection can describe every service the server has
    for blob in (grpc_descriptors.MODEL_CONFIG, grpc_descriptors.GRPC_SERVICE,
                 health_pb2.DESCRIPTOR.serialized_pb, reflection_pb2.DESCRIPTOR.serialized_pb):
        pool.AddSerializedFile(blob)
    return pool


POOL = _pool()
_FILE = POOL.FindFileByName("grpc_service.proto")
#: Every message of ``grpc_service.proto`` by its name: ``pb.ModelInferRequest`` and so on.
pb = SimpleNamespace(**{name: message_factory.GetMessageClass(d) for name, d in _FILE.message_types_by_name.items()})
#: Each method of the service: (request class, response class).
METHODS = {m.name: (message_factory.GetMessageClass(m.input_type), message_factory.GetMessageClass(m.output_type))
           for m in _FILE.services_by_name[SERVICE.split(".")[-1]].methods}


def path(method: str) -> str:
    """A method's HTTP/2 path: ``/inference.GRPCInferenceService/ModelInfer``."""
    return f"/{SERVICE}/{method}"


def write(target: Path | None = None) -> Path:
    """``grpc_descriptors.py`` anew from the installed tritonclient's generated modules."""
    from importlib import metadata

    from tritonclient.grpc import model_config_pb2, service_pb2

    target = target or Path(__file__).with_name("grpc_descriptors.py")
    version = metadata.version("tritonclient")

    def literal(blob: bytes) -> str:
        lines = [repr(blob[i:i + 64]) for i in range(0, len(blob), 64)]
        return "(\n    " + "\n    ".join(lines) + "\n)"

    target.write_text(
        '"""Triton\'s grpc_service.proto and model_config.proto as serialized FileDescriptorProtos, copied from\n'
        f"tritonclient {version}'s generated modules by ``python -m cnnserve.core.grpc_proto --write``\n"
        '(``grpc_proto.py`` says why). Generated: do not edit."""\n\n'
        f"SOURCE = {'tritonclient ' + version!r}\n"
        f"MODEL_CONFIG = {literal(model_config_pb2.DESCRIPTOR.serialized_pb)}\n"
        f"GRPC_SERVICE = {literal(service_pb2.DESCRIPTOR.serialized_pb)}\n")
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m cnnserve.core.grpc_proto --write")
    print(f"wrote {write()}")
