"""Regenerates the Python stubs (messages, typed .pyi and gRPC services) from protos/ into the meshpilot package."""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def main() -> int:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    # Every generated directory becomes a regular package so setuptools ships it and imports need no path tricks.
    for proto in protos:
        package_dir = (ROOT / proto).parent
        while package_dir != ROOT / "meshpilot":
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent
    print(f"generated stubs for {len(protos)} proto files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
