"""The committed stubs are exactly what the committed .proto generates."""

import filecmp
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fedlora_protoc", ROOT / "tools" / "protoc.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    generator = _load_generator()

    generated = generator.generate(tmp_path)

    committed_root = ROOT / "common" / "src"
    assert generated, "protoc generated nothing"
    for path in generated:
        committed = committed_root / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed; run `make protos`"
        assert filecmp.cmp(path, committed, shallow=False), f"{committed} is stale; run `make protos`"
    committed_files = {
        p.relative_to(committed_root)
        for p in (committed_root / "fedlora_common" / "proto").rglob("*_pb2*")
        if p.suffix in {".py", ".pyi"}
    }
    assert committed_files == {p.relative_to(tmp_path) for p in generated}
