"""Generate the gRPC stubs for protocol/fedge.proto with grpcio-tools.

The stubs are checked in (so importing fedge needs no build step); a test regenerates them into a
temporary directory and fails if they differ from the checked-in files.

    python -m fedge.protocol.codegen            # rewrite protocol/fedge_pb2.py, fedge_pb2_grpc.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO = PROTO_DIR / "fedge.proto"
OUTPUTS = ("fedge_pb2.py", "fedge_pb2_grpc.py")


def generate(out_dir: Path) -> dict[str, str]:
    """Run protoc on fedge.proto into out_dir; return {file name: text} of the stubs."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}", str(PROTO),
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    texts = {}
    for name in OUTPUTS:
        text = (out_dir / name).read_text()
        # the generated grpc module imports `fedge_pb2` as a top-level module; make it a package import
        package_import = "from fedge.protocol import fedge_pb2 as fedge__pb2"
        texts[name] = text.replace("import fedge_pb2 as fedge__pb2", package_import)
    return texts


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in generate(Path(tmp)).items():
            (PROTO_DIR / name).write_text(text)
            print(f"wrote {PROTO_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
