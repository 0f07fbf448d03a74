"""``python -m benchmarks [--quick] [--out DIR] [--case NAME ...]``: run the cases, print the tables,
write ``<out>/{quick,full}.json`` and ``.md``. Diagnostics go to the log (stderr)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from benchmarks.harness import CaseSkipped
from benchmarks.table import format_markdown, format_text
from benchmarks.targets import check_targets

# Case name -> "module:function", each function ``(quick, workdir) -> CaseResult``.
CASES = {
    "digits_cnn": "benchmarks.digits_cnn:run",
    "depthwise_cnn": "benchmarks.depthwise_cnn:run",
    "resnet18_cnn": "benchmarks.cnn:run_resnet18",
    "mobilenetv2_cnn": "benchmarks.cnn:run_mobilenetv2",
    "minilm": "benchmarks.minilm:run",
    "calibration": "benchmarks.calibration:run",
    "smollm2": "benchmarks.smollm2:run",
    "executors": "benchmarks.executors:run",
    "real_models": "benchmarks.real_models:run",
}
logger = logging.getLogger("benchmarks")


def _environment(quick: bool) -> dict:
    versions = {}
    for package in ("qcompile", "onnxruntime", "onnx", "numpy", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"mode": "quick" if quick else "full", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "versions": versions}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller models, fewer samples and runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where the JSON and Markdown go")
    parser.add_argument("--case", action="append", choices=CASES, help="run only this case (repeatable)")
    parser.add_argument("--readme", type=Path, help="also write the Markdown between the benchmark markers of this README")
    parser.add_argument("--readme-block", default="benchmarks",
                        help="which README block: <!-- NAME:begin --> ... <!-- NAME:end --> (default: benchmarks)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("benchmarks").setLevel(logging.INFO)

    environment = _environment(args.quick)
    results, failed, skipped = [], [], {}
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as workdir:
        for name in args.case or CASES:
            start = time.perf_counter()
            try:
                # Exporters and ORT's quantizer print progress to stdout; stdout is for the table.
                with contextlib.redirect_stdout(sys.stderr):
                    module, function = CASES[name].split(":")
                    case = getattr(importlib.import_module(module), function)(args.quick, Path(workdir))
            except CaseSkipped as reason:
                logger.warning("case %s skipped: %s", name, reason)
                skipped[name] = str(reason)
                continue
            except Exception:
                logger.exception("case %s failed", name)
                failed.append(name)
                continue
            case.details["case_seconds"] = round(time.perf_counter() - start, 1)
            logger.info("case %s took %.0f s", name, case.details["case_seconds"])
            results.append(case)
            print(format_text(case) + "\n", flush=True)

    targets = check_targets({case.name: case for case in results})
    if targets is not None:
        print(format_text(targets) + "\n", flush=True)
        results.insert(0, targets)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (environment["mode"] if args.readme_block == "benchmarks" else f"{environment['mode']}_{args.readme_block}")
    payload = {"environment": environment, "failed": failed, "skipped": skipped, "cases": [dataclasses.asdict(c) for c in results]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in environment["versions"].items())
    header = (f"# qcompile benchmarks ({environment['mode']})\n\n{environment['date']}, {environment['cpus']} CPUs, "
              f"Python {environment['python']}; {versions}\n\n")
    skipped_md = "".join(f"- {name} skipped: {reason}\n" for name, reason in skipped.items())
    markdown = header + skipped_md + "\n".join(format_markdown(c) for c in results)
    stem.with_suffix(".md").write_text(markdown)
    if args.readme:
        _write_into_readme(args.readme, markdown, args.readme_block)
    logger.info("wrote %s.json and %s.md", stem, stem)
    return 1 if failed else 0


README_BEGIN, README_END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def _write_into_readme(readme: Path, markdown: str, block: str = "benchmarks") -> None:
    """Replace what lies between the README's markers of ``block``, so its tables are generated, not typed."""
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} block to write into")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    # One heading level down, so the tables sit under the README's own "Results" heading.
    body = "\n".join(("#" + line) if line.startswith("#") else line for line in markdown.splitlines())
    readme.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
