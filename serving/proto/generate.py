"""Generate the Python code of the service protos with grpcio-tools (protoc bundled in the wheel).

    python -m serving.proto.generate            # rewrites rankstage/v1/ranking_pb2{,_grpc}.py{,i} in the repo

``serving/proto`` is the include root, so package ``rankstage.v1`` lands in ``rankstage/v1/`` and the generated
imports (``from rankstage.v1 import ranking_pb2``) resolve from the repository root. ``tests/test_proto.py``
regenerates into a temporary directory and fails if the committed code differs (stale after a .proto edit).
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent.parent
PROTOS = ("rankstage/v1/ranking.proto",)


def generate(out_dir: str | Path = REPO_ROOT) -> list[Path]:
    """Run protoc on ``PROTOS`` into ``out_dir``; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for proto in PROTOS:
        (out_dir / Path(proto).parent).mkdir(parents=True, exist_ok=True)
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}",
                            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO_ROOT / proto)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {code})")
    return sorted(p for proto in PROTOS for p in (out_dir / Path(proto).parent).glob(Path(proto).stem + "_pb2*"))


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else REPO_ROOT):
        print(path)
