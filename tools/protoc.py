"""Regenerate the protobuf/gRPC stubs (and their .pyi) from proto/ into fedlora_common.

The proto tree is mapped onto the Python package `fedlora_common.proto`, so the generated
modules import each other as `fedlora_common.proto.fedlora.v1...` with no rewriting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE_ROOT = ROOT / "common" / "src"
VIRTUAL_PREFIX = "fedlora_common/proto"


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs for every .proto under proto/ into out_dir; return the files written."""
    protos = sorted(p.relative_to(PROTO_DIR) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    # The mypy-protobuf plugins sit beside this interpreter; PATH need not include them.
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{VIRTUAL_PREFIX}={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(f"{VIRTUAL_PREFIX}/{p}" for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted((out_dir / VIRTUAL_PREFIX).rglob("*.py*"))
    for directory in {p.parent for p in generated} | {out_dir / VIRTUAL_PREFIX}:
        for parent in [directory, *directory.parents]:
            if parent == out_dir or out_dir not in parent.parents:
                break
            (parent / "__init__.py").touch()
    return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PACKAGE_ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        sys.stdout.write(f"{path}\n")


if __name__ == "__main__":
    main()
