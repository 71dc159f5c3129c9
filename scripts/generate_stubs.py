"""Regenerate the checked-in protobuf and gRPC code from the .proto sources.

Usage: python scripts/generate_stubs.py [--check]

Beside the modules, each target gets `<name>.binpb`: a FileDescriptorSet of
the .proto file with its source info, from which the gateway takes the
comments that document its OpenAPI description (the generated modules drop
them).

With --check nothing is written; the exit status is 1 when the checked-in
code differs from a fresh generation.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

from google.api import annotations_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
# (proto include root, proto file relative to it, import prefix, output package dir)
TARGETS = [
    (ROOT / "protos", "porch/v1/porch.proto", "porch.v1", ROOT / "porch_stubs" / "v1"),
    (
        ROOT / "tests" / "gateway" / "protos",
        "echo/v1/echo.proto",
        "echo.v1",
        ROOT / "tests" / "gateway" / "testproto",
    ),
]


def generate(include: Path, proto: str, prefix: str, package: str, out_dir: Path) -> None:
    """Run protoc into out_dir, rewriting generated imports to the package's name."""
    googleapis = Path(annotations_pb2.__file__).parent.parent.parent
    wkt = Path(protoc.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{include}",
            f"-I{googleapis}",
            f"-I{wkt}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            f"--descriptor_set_out={Path(tmp) / Path(proto).with_suffix('.binpb')}",
            "--include_source_info",
            str(include / proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted((Path(tmp) / Path(proto).parent).iterdir()):
            if path.suffix == ".binpb":
                (out_dir / path.name).write_bytes(path.read_bytes())
                continue
            text = re.sub(
                rf"\bfrom {re.escape(prefix)} import\b", f"from {package} import", path.read_text()
            )
            (out_dir / path.name).write_text(text)


def main() -> int:
    """Generate every target, or compare a fresh generation with the tree."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the checked-in code is stale")
    check = parser.parse_args().check
    stale = []
    for include, proto, prefix, out_dir in TARGETS:
        package = ".".join(out_dir.relative_to(ROOT).parts)
        if not check:
            generate(include, proto, prefix, package, out_dir)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            generate(include, proto, prefix, package, Path(tmp))
            names = sorted(path.name for path in Path(tmp).iterdir())
            stale += [
                str(out_dir.relative_to(ROOT) / name)
                for name in names
                if not (out_dir / name).exists()
                or not filecmp.cmp(out_dir / name, Path(tmp) / name, shallow=False)
            ]
    if stale:
        print("generated code is out of date; run scripts/generate_stubs.py:", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
