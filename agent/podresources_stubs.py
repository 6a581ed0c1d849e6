"""Generate the Python stubs of the kubelet PodResources v1 proto (`make podresources-stubs`).

The proto (`wattsched_agent/podresources_v1/api.proto`) is a verbatim copy from the k8s.io/kubelet
Go module; the stubs are generated next to it with grpcio-tools (pinned in the dev extras) and
committed, so the image needs no code generator. `tests/agent/test_podresources.py` runs this
script into a temporary folder and fails when the committed stubs differ.

Usage: python agent/podresources_stubs.py OUT_ROOT  (OUT_ROOT/wattsched_agent/podresources_v1/)
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

AGENT_ROOT = Path(__file__).resolve().parent
PROTO = "wattsched_agent/podresources_v1/api.proto"
GENERATED = ("api_pb2.py", "api_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under `out_root`; returns their paths."""
    target = out_root / Path(PROTO).parent
    target.mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{AGENT_ROOT}",
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            PROTO,
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    return [target / name for name in GENERATED]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for path in generate(Path(sys.argv[1])):
        print(f"generated {path}")
