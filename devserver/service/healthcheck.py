"""`python -m devserver.service.healthcheck ADDR`: exit 0 if the server reports SERVING.

For container health checks where grpc_health_probe is not installed.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m devserver.service.healthcheck unix:PATH|HOST:PORT", file=sys.stderr)
        return 2
    try:
        with grpc.insecure_channel(argv[0]) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
    except grpc.RpcError as e:
        print(f"unhealthy: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    serving = answer.status == health_pb2.HealthCheckResponse.SERVING
    print("serving" if serving else "not serving")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
