"""The ``qcompile`` command line: compile, run, passes, targets, inspect, verify, debug.

Exit codes: 0 ok, 2 bad input or usage, 3 accuracy gate failed, 1 an internal error (a bug).
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import traceback
from collections import Counter
from pathlib import Path

from qcompile.errors import AccuracyGateError, QcompileError

logger = logging.getLogger("qcompile")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits with 2 too; keep the message one clear line
        self.print_usage(sys.stderr)
        print(f"qcompile: error: {message}", file=sys.stderr)
        raise SystemExit(2)


# CLI flag -> CompileConfig field, one to one.
_CONFIG_FLAGS = {
    "target": "target",
    "activation_type": "activation_type",
    "weight_type": "weight_type",
    "calibration_method": "calibration_method",
    "percentile": "percentile",
    "exclude_nodes": "exclude_nodes",
    "exclude_op_types": "exclude_op_types",
    "exclude_regex": "exclude_regex",
    "min_sqnr": "min_sqnr",
    "threads": "threads",
    "eval_batches": "eval_batches",
    "pipeline": "pipeline",
    "recipe": "recipe",
    "allow_fallback": "allow_fallback",
    "ep_context": "ep_context_path",
    "cache": "cache",
    "cache_dir": "cache_dir",
    "cache_max_mb": "cache_max_mb",
    "search": "search",
    "max_loss": "max_loss",
    "metric": "metric",
    "time_budget": "time_budget",
    "cross_layer_equalization": "cross_layer_equalization",
    "bias_correction": "bias_correction",
    "adaround": "adaround",
    "gptq_rounding": "gptq_rounding",
    "executor": "executor",
    "workers": "workers",
    "ray_address": "ray_address",
}
# Flags of `qcompile compile` that say what to run on and where to write, not how to compile.
_RUN_FLAGS = {"model", "output", "calib", "eval_data", "config", "print_pipeline", "dump_after", "dump_dir",
              "report", "quiet", "verbose", "log_format", "help"}
# Flags that set a key in their own way (a different shape of value).
_SHAPED_FLAGS = {"no_latency": "measure_latency", "no_recover": "recover", "shape": "input_shapes"}


def compile_flag_keys() -> dict[str, str | None]:
    """Every ``qcompile compile`` flag -> the CompileConfig key it sets (None: a run option).

    Raises if a flag is in neither table: a new flag must map onto a key (or be a run option)."""
    compile_parser = _build_parser()._subparsers._group_actions[0].choices["compile"]
    keys = {}
    for action in compile_parser._actions:
        flag = max(action.option_strings, key=len) if action.option_strings else action.dest
        if action.dest in _RUN_FLAGS:
            keys[flag] = None
        elif action.dest in _CONFIG_FLAGS or action.dest in _SHAPED_FLAGS:
            keys[flag] = _CONFIG_FLAGS.get(action.dest) or _SHAPED_FLAGS[action.dest]
        else:
            raise AssertionError(f"compile flag {flag} maps onto no config key: add it to _CONFIG_FLAGS or _RUN_FLAGS")
    return keys


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("qcompile")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qcompile", description="Quantization compiler for ONNX models.")
    parser.add_argument("--version", action="version", version=f"qcompile {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compile", help="quantize a model for a target")
    c.add_argument("model", help="ONNX model file, or a causal language model: a Hugging Face folder or a .gguf file")
    c.add_argument("-o", "--output", help="output model path (default: MODEL.<target>.onnx)")
    c.add_argument("--calib", help="directory of .npz calibration batches (keys = input names); for a language "
                   "model folder or .gguf file also a text file, tokenized by the model's tokenizer")
    c.add_argument("--eval", dest="eval_data", help="directory of .npz evaluation batches (default: held-out calibration batches)")
    c.add_argument("--config", help="qcompile.toml with CompileConfig keys")
    c.add_argument("--target", help="target name (`qcompile targets`); default cpu")
    c.add_argument("--pipeline", help="comma-separated passes with options, e.g. 'fix-names,calibrate(method=mse)'")
    c.add_argument("--recipe", help="a named pipeline: llm-int4, llm-gguf, llm-int8-weight, llm-w8a8, "
                   "llm-w8a8-outliers, llm-fp8 (see --print-pipeline)")
    c.add_argument("--print-pipeline", action="store_true", help="print the pipeline this run would use and exit")
    c.add_argument("--dump-after", action="append", default=[], metavar="PASS", help="save the model after PASS (or 'all'); repeatable")
    c.add_argument("--dump-dir", help="where --dump-after writes (default: OUTPUT.dumps/)")
    c.add_argument("--activation-type", help="uint8 (default on cpu), int8, uint16, int16, "
                   "float8e4m3fn, float8e5m2 (FP8: with an FP8 --weight-type)")
    c.add_argument("--weight-type", help="the target's default (cpu, openvino: int7, int8 codes in [-64, 63] "
                   "that AVX2-only CPUs' integer kernels do not saturate; elsewhere int8), int8 (cpu: for CPUs with VNNI "
                   "or Arm), float8e4m3fn, float8e5m2")
    c.add_argument("--calibration-method", help="mse (default), minmax, percentile, entropy, or auto (per tensor, "
                   "the method with the least error)")
    c.add_argument("--percentile", type=float, help="percentile for --calibration-method percentile")
    c.add_argument("--exclude-nodes", nargs="+", metavar="NAME", help="node names to keep in float")
    c.add_argument("--exclude-op-types", nargs="+", metavar="OP", help="op types to keep in float")
    c.add_argument("--exclude-regex", nargs="+", metavar="REGEX", help="keep nodes whose name matches in float")
    c.add_argument("--min-sqnr", type=float, metavar="DB", help="fail with exit code 3 if any output's SQNR is below DB")
    c.add_argument("--search", action="store_true", default=None,
                   help="search for accuracy measures until --min-sqnr holds (qcompile.analysis.accuracy_search)")
    c.add_argument("--max-loss", metavar="LOSS",
                   help="search until the relative loss is at most LOSS (1%% or 0.01): of --metric, else the "
                        "outputs' relative RMS error (SQNR >= -20 log10(LOSS) dB)")
    c.add_argument("--metric", metavar="MODULE.py:FUNCTION",
                   help="score(run, batches) -> float, higher is better; run(batch) returns the outputs of the model scored")
    c.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop the accuracy search after about SECONDS")
    c.add_argument("--no-recover", action="store_true",
                   help="ship the plain compile even when its worst output SQNR is below the recovery floor "
                        "(default: search for accuracy measures, see recover_min_sqnr, and exit 3 if still below)")
    for name, what in (("cross-layer-equalization", "cross-layer equalization"), ("bias-correction", "bias correction"),
                       ("adaround", "AdaRound"), ("gptq-rounding", "GPTQ rounding (per-channel weights)")):
        c.add_argument(f"--{name}", action="store_true", default=None, help=f"add the {what} pass to the pipeline")
    c.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's)")
    c.add_argument("--eval-batches", type=int, help="at most this many evaluation batches (default 8)")
    c.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    c.add_argument("--report", help="report path (default: OUTPUT less .onnx, plus .report.json: "
                   "-o out/m.int8.onnx writes out/m.int8.report.json)")
    c.add_argument("--shape", action="append", default=[], metavar="NAME=1x3x224x224",
                   help="static shape of an input, for targets that need one (repeatable; default: the first calibration batch's)")
    c.add_argument("--allow-fallback", action="store_true", default=None,
                   help="compile even when nodes would run on the CPU provider instead of the target's (reported)")
    c.add_argument("--ep-context", metavar="PATH",
                   help="qnn-htp: also write the EP-context model (precompiled QNN context binary) to PATH")
    c.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                   help="run every pass; neither read nor write the pass cache")
    c.add_argument("--cache-dir", help="pass cache folder (default: $QCOMPILE_CACHE_DIR, else ~/.cache/qcompile)")
    c.add_argument("--cache-max-mb", type=int, metavar="MB",
                   help="delete least recently used cache entries beyond this size (default 2000, i.e. 2 GB)")
    _add_executor_flags(c)

    v = sub.add_parser("verify", help="check a compiled model against its report; optionally compile it again")
    v.add_argument("model", help="the compiled model to check")
    v.add_argument("--report", help="the report written with it (default: MODEL less .onnx, plus .report.json; "
                   "else report.json beside MODEL, as earlier versions named it)")
    v.add_argument("--model", dest="source_model", metavar="FLOAT_MODEL",
                   help="the model it was compiled from: compile it again with the report's config and compare bytes")
    v.add_argument("--calib", help="the calibration data it was compiled with (with --model)")

    r = sub.add_parser("run", help="run a model on a target's provider; print where each node runs and the outputs")
    r.add_argument("model", help="the ONNX model to run (a compiled one, typically)")
    r.add_argument("--target", default="cpu", help="target whose provider runs it (`qcompile targets`; default cpu)")
    r.add_argument("--inputs", help=".npz with one array per model input (default: random data of the model's static shapes)")
    r.add_argument("--allow-fallback", action="store_true", help="let nodes the provider refuses run on the CPU provider")
    r.add_argument("--nodes", action="store_true", help="list every node with its provider")
    r.add_argument("--per-op", action="store_true",
                   help="a QDQ model: run every quantized node unit alone on the CPU reference's input codes "
                        "and print how the provider agrees with the reference, op by op")

    sub.add_parser("passes", help="list the passes a pipeline can use")
    g = sub.add_parser("config", help="the config's reference: keys, types, defaults, flags; or check a qcompile.toml")
    shown = g.add_mutually_exclusive_group()
    shown.add_argument("--schema", action="store_true", help="print the JSON Schema of qcompile.toml")
    shown.add_argument("--reference", action="store_true", help="print the reference table (Markdown; the default)")
    shown.add_argument("--check", metavar="TOML", help="validate a qcompile.toml and print it with every default filled in")
    sub.add_parser("targets", help="list targets and their rules")
    i = sub.add_parser("inspect", help="inputs, opset, op histogram, and what would be quantized")
    i.add_argument("model", help="the float ONNX model to inspect")
    i.add_argument("--target", default="cpu", help="target whose rules decide what would be quantized (default cpu)")
    i.add_argument("--json", action="store_true", help="print JSON")
    d = sub.add_parser("debug", help="per-layer error analysis of a quantized model against its float original")
    d.add_argument("float_model", metavar="FLOAT", help="the float ONNX model")
    d.add_argument("quant_model", metavar="QUANT", help="the quantized (QDQ) ONNX model compiled from FLOAT")
    d.add_argument("--data", required=True, help="directory of .npz batches (keys = input names, as for --calib), or one .npz")
    d.add_argument("--out", metavar="HTML", help="write the HTML report (one self-contained file)")
    d.add_argument("--json", metavar="JSON", dest="json_path", help="write the JSON report")
    d.add_argument("--top", type=int, default=10, help="how many of the worst layers to print (default 10)")
    d.add_argument("--max-batches", type=int, help="use only the first N batches")
    d.add_argument("--group-size", type=int, help="tensors exposed per ONNX Runtime session (memory bound; default 32)")
    d.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: ORT's)")
    se = sub.add_parser("sensitivity", help="layer-wise sensitivity: compile with each quantized node kept float, "
                        "measure the outputs (in parallel with --executor)")
    se.add_argument("model", help="the float ONNX model")
    se.add_argument("--calib", required=True, help="directory of .npz calibration batches (keys = input names)")
    se.add_argument("--eval", dest="eval_data", help="directory of .npz evaluation batches (default: held-out calibration batches)")
    se.add_argument("--config", help="qcompile.toml with CompileConfig keys")
    se.add_argument("--target", help="target name (`qcompile targets`); default cpu")
    se.add_argument("--metric", metavar="MODULE.py:FUNCTION", help="also score each candidate with this metric (higher is better)")
    se.add_argument("--nodes", nargs="+", metavar="NAME", help="only these nodes (default: every node the compile quantizes)")
    se.add_argument("--top", type=int, default=10, help="how many of the most sensitive nodes to print (default 10)")
    se.add_argument("--json", metavar="JSON", dest="json_path", help="write every row and the summary as JSON")
    _add_executor_flags(se)
    b = sub.add_parser("build", help="compile every (model, target) a build file lists, each as its own task; "
                       "one combined report (exit code: the worst entry's)")
    b.add_argument("build_file", metavar="BUILD.toml", help="the build file: [defaults] and one [[model]] table per "
                   "model (model, calib, eval, targets, config); see qcompile.scaleout.build")
    b.add_argument("-o", "--out-dir", metavar="OUTDIR",
                   help="where models and reports go (default: the file's out_dir, else BUILD-build/ beside it)")
    b.add_argument("--dry-run", action="store_true", help="check the build file, list its entries and exit")
    _add_executor_flags(b)
    pp = sub.add_parser("perplexity", help="a compiled language model's perplexity on a text file")
    _add_language_model_flags(pp)
    pp.add_argument("--text", required=True, help="the text file, tokenized by the model's tokenizer")
    pp.add_argument("--windows", type=int, default=16, help="how many consecutive windows of the text (default 16)")
    pp.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    pp.add_argument("--reference", help="the float model (.onnx, or its folder): also its perplexity, the mean KL "
                    "divergence of the next-token distributions from it, and top-1 agreement")
    ge = sub.add_parser("generate", help="greedy generation with a compiled language model, through its key/value cache")
    _add_language_model_flags(ge)
    ge.add_argument("--prompt", required=True, help="the text to continue")
    ge.add_argument("--max-new-tokens", type=int, default=32, help="at most this many new tokens (default 32)")
    _add_logging_flags(parser, in_subcommand=False)
    for subparser in sub.choices.values():
        _add_logging_flags(subparser, in_subcommand=True)
    return parser


def _add_language_model_flags(parser: argparse.ArgumentParser) -> None:
    """The compiled language model, its tokenizer and threads: what perplexity and generate share."""
    parser.add_argument("model", help="a folder holding model.onnx (as compile FOLDER -o out/ writes) or an .onnx file")
    parser.add_argument("--tokenizer", help="a folder or .gguf file with the tokenizer (default: the model's folder)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: ORT's)")


def _add_executor_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=("inprocess", "local", "ray"),
                        help="where repeated work runs: this process (default), --workers local processes, or Ray")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="worker processes (local; default one per core) or Ray tasks at once (default: the cluster's CPUs)")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="the Ray cluster to use: auto (the one `ray start` runs here), HOST:6379 or "
                             "ray://HOST:10001 (default: start a local Ray)")


def _add_logging_flags(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """-v, -q and --log-format, the same before or after the subcommand (qcompile -q compile ... is
    qcompile compile -q ...). A subcommand's own default is SUPPRESS, so it keeps the top level's."""
    from qcompile.log import LOG_FORMATS

    flags = [
        (("-v", "--verbose"), {"action": "store_true", "default": False,
                               "help": "debug logging: every pass with its time, other libraries' info"}),
        (("-q", "--quiet"), {"action": "store_true", "default": False,
                             "help": "warnings and errors only; compile: no summary, no progress"}),
        (("--log-format",), {"choices": LOG_FORMATS, "default": "text",
                             "help": "log lines on stderr as human text (default) or one JSON object per line"}),
    ]
    for names, options in flags:
        if any(name in parser._option_string_actions for name in names):
            continue  # a subcommand that defines the flag itself keeps its own
        parser.add_argument(*names, **{**options, **({"default": argparse.SUPPRESS} if in_subcommand else {})})


def _config_from_args(args):
    from qcompile.api import resolve_config

    overrides = {}
    for flag, field in _CONFIG_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    if args.pipeline:
        overrides["pipeline"] = [args.pipeline]
    if args.no_latency:
        overrides["measure_latency"] = False
    if args.no_recover:
        overrides["recover"] = False
    if args.shape:
        overrides["input_shapes"] = dict(_parse_shape(text) for text in args.shape)
    config = resolve_config(args.config, **overrides)
    # The pass cache is on for the command line unless the config file or --no-cache turns it off.
    return config if config.cache is not None else config.replace(cache=True)


def _parse_shape(text: str) -> tuple[str, list[int]]:
    from qcompile.errors import ConfigError

    name, _, dims = text.rpartition("=")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        shape = []
    if not name or not shape or any(d <= 0 for d in shape):
        raise ConfigError(f"--shape {text!r} must be NAME=DIMxDIM..., e.g. --shape input=1x3x224x224.")
    return name, shape


def _cmd_compile(args) -> int:
    import qcompile
    from qcompile.backends import get_target
    from qcompile.io.outputs import check_destination, check_not_read, report_path_for, write_text_atomically
    from qcompile.core.pipeline import format_pipeline, parse_pipeline
    from qcompile.core.recipes import pipeline_for
    from qcompile.io.causal_lm import export_causal_lm, export_folder, is_causal_lm_source, text_batches

    config = _config_from_args(args)
    if args.print_pipeline:
        target = get_target(config.target)
        print(format_pipeline(parse_pipeline(pipeline_for(config.pipeline, config.recipe, target, config))))
        return 0
    model_path = Path(args.model)
    output = Path(args.output) if args.output else model_path.with_suffix(f".{config.target}.onnx")
    language_model = model_path if is_causal_lm_source(model_path) else None
    if language_model is not None:
        output = _language_model_output(language_model, args.output, config.target)
        # Exported once, here: the recovery and the accuracy search compile the .onnx file again and again.
        model_path = export_causal_lm(language_model, export_folder())
    report_path = Path(args.report) if args.report else report_path_for(output)
    reads = _files_read(args, config, model_path, (output, report_path))
    for path, flag in ((output, "-o"), (report_path, "--report")):
        check_not_read(path, reads, flag)
    if language_model is not None:
        # A text file is calibration (and evaluation) data for a language model: tokenized here.
        for flag, name in (("--calib", "calib"), ("--eval", "eval_data")):
            text = getattr(args, name)
            if text is not None and Path(text).is_file():
                setattr(args, name, text_batches(language_model, Path(text)))
                logger.info("%s %s: %d windows of its tokens", flag, text, len(getattr(args, name)))
    if _same_file(report_path, output):
        raise qcompile.OutputError(f"--report and -o both name {str(output)!r}; give the report another path.")
    if model_path.is_file():  # a missing model gets its own error from the loader
        # Destinations are checked before the compile, which can take long, not after it.
        check_destination(output, flag="-o")
        check_destination(report_path, flag="--report")
        if config.ep_context_path:
            check_destination(Path(config.ep_context_path), reads=reads, flag="--ep-context")
    dump_dir = args.dump_dir or (str(output) + ".dumps" if args.dump_after else None)
    if config.search or config.max_loss is not None or config.metric or config.time_budget is not None:
        return _compile_search(args, config, model_path, output, report_path)
    # Recovery (the default) writes the best model it found even when it misses its floor, and
    # exits 3; the accuracy gate (--min-sqnr) writes no model when it fails.
    recovering = config.recover and config.min_sqnr is None and args.calib is not None and not args.dump_after
    try:
        if recovering:
            from qcompile.analysis.accuracy_search import compile_or_recover

            result = compile_or_recover(str(model_path), args.calib, config=config, eval_data=args.eval_data,
                                        show_progress=_progress(args))
        else:
            result = qcompile.compile(
                str(model_path), args.calib, config=config, eval_data=args.eval_data,
                dump_after=args.dump_after, dump_dir=dump_dir,
                show_progress=_progress(args),
            )
    except AccuracyGateError as error:
        if recovering and getattr(error, "result", None) is not None:
            error.result.reads += reads
            error.result.save(output, report_path=report_path)
            if not args.quiet:
                print(error.result.report)
                print(f"wrote {output} and {report_path} (the best found; the recovery floor was not met)")
            raise
        # The report says how far it missed; the model is not written, so no build step can ship it.
        if getattr(error, "result", None) is not None:
            write_text_atomically(report_path, error.result.report.to_json(), reads=reads, flag="--report")
            if not args.quiet:
                print(error.result.report)
            if args.log_format == "json":
                logger.info("report: %s", report_path, extra={"report": str(report_path)})
            else:
                print(f"report: {report_path}", file=sys.stderr)
        raise
    result.reads += reads
    result.save(output, report_path=report_path)
    copied = _copy_tokenizer(language_model, output) if language_model is not None else []
    if not args.quiet:
        print(result.report)
        print(f"wrote {output} and {report_path}" + (f", and beside them {', '.join(copied)}" if copied else ""))
    return 0


def _language_model_output(source: Path, requested: str | None, target: str) -> Path:
    """A language model goes into a folder of its own with its tokenizer files: ``-o DIR/`` (or an
    existing folder) means DIR/model.onnx; by default SOURCE.TARGET/model.onnx beside the source."""
    if requested is None:
        folder = source.with_name(f"{source.stem if source.is_file() else source.name}.{target}")
    elif requested.endswith(("/", os.sep)) or Path(requested).is_dir():
        folder = Path(requested)
    else:
        return Path(requested)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "model.onnx"


def _copy_tokenizer(source: Path, output: Path) -> list[str]:
    """The source folder's tokenizer and generation files, beside the compiled model (never over a
    different file of the same name that is already there: that one is kept, with a warning)."""
    from qcompile.io.causal_lm import tokenizer_files

    copied = []
    for name in tokenizer_files(source):
        destination = output.parent / name
        if destination.exists() and destination.read_bytes() != (source / name).read_bytes():
            logger.warning("kept %s: it differs from %s's, which was not copied over it", destination, name)
            continue
        shutil.copyfile(source / name, destination)
        copied.append(name)
    return copied


def _files_read(args, config, model_path: Path, destinations) -> list:
    """What this compile reads: model, external data, data files, config, metric. The model's
    external data names are read from the file only when a destination exists (else it cannot be
    one of them)."""
    from qcompile.io.outputs import files_read

    existing = any(os.path.lexists(p) for p in destinations) or bool(config.ep_context_path)
    return files_read(model=model_path, external_data=None if existing else [], calibration=args.calib,
                      evaluation=args.eval_data, config=args.config, metric=config.metric)


def _compile_search(args, config, model_path: Path, output: Path, report_path: Path) -> int:
    """compile with --search/--max-loss: the best model found is written even when the budget is
    missed (then the exit code is 3), with the search in the report."""
    from qcompile.analysis.accuracy_search import compile_within_budget
    from qcompile.errors import ConfigError

    if config.metric and config.max_loss is None:
        raise ConfigError("--metric needs --max-loss, the relative loss allowed on it (e.g. --max-loss 1%).")
    if config.max_loss is None and config.min_sqnr is None:
        raise ConfigError("The accuracy search needs a budget: --max-loss LOSS (with or without --metric) or --min-sqnr DB.")
    if args.dump_after:
        raise ConfigError("--dump-after does not combine with the accuracy search (it compiles many candidates).")
    error = None
    try:
        result, _ = compile_within_budget(
            str(model_path), args.calib, config=config, eval_data=args.eval_data,
            max_loss=None if config.max_loss is None else str(config.max_loss), metric=config.metric,
            min_sqnr=None if config.max_loss is not None else config.min_sqnr,
            time_budget=config.time_budget, show_progress=_progress(args),
        )
    except AccuracyGateError as missed:
        if getattr(missed, "result", None) is None:
            raise
        result, error = missed.result, missed
    result.reads += _files_read(args, config, model_path, (output, report_path))
    result.save(output, report_path=report_path)
    if not args.quiet:
        print(result.report)
        print(f"wrote {output} and {report_path}" + (" (the best found; the budget was not met)" if error else ""))
    if error is not None:
        raise error
    return 0


def _progress(args):
    """How compile shows calibration progress: a rewritten line on a terminal, log records in
    JSON mode, nothing with -q. When stderr is a file or a pipe (a CI log), a log line every 10 s
    and one when the step ends: a build log shows the compile is alive without a line per batch."""
    from qcompile.log import LogProgress, TerminalProgress

    if args.quiet:
        return False
    if args.log_format == "json":
        return LogProgress()
    return TerminalProgress() if sys.stderr.isatty() else LogProgress(interval=10.0)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal once resolved, or hard links of one file."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _cmd_verify(args) -> int:
    from qcompile.io.outputs import report_path_for
    from qcompile.core.reproduce import verify_artifact

    report = Path(args.report) if args.report else report_path_for(Path(args.model))
    legacy = Path(args.model).parent / "report.json"
    if not args.report and not report.exists() and legacy.is_file():
        # Compiled before reports were named after their model; the recorded hash says whether it is this model's.
        report = legacy
    for line in verify_artifact(args.model, report, model=args.source_model, calibration_data=args.calib):
        print(line)
    return 0


def _cmd_config(args) -> int:
    from qcompile.core.config import load_config
    from qcompile.core.config_reference import config_reference_markdown, config_schema

    if args.schema:
        print(json.dumps(config_schema(), indent=2))
    elif args.check:
        print(json.dumps(load_config(args.check).to_dict(), indent=2))
    else:
        print(config_reference_markdown(compile_flag_keys()), end="")
    return 0


def _cmd_passes(args) -> int:
    from qcompile.passes import registered_passes

    for name, info in registered_passes().items():
        options = ", ".join(f"{k}={v!r}" for k, v in info.options.items())
        print(f"{name:20s} {info.summary}" + (f"  [options: {options}]" if options else ""))
    return 0


def _cmd_targets(args) -> int:
    from qcompile.backends import available_targets
    from qcompile.io.providers import provider_status

    for target in available_targets().values():
        print(f"{target.name}: {target.description}")
        for status in map(provider_status, target.providers):
            state = f"installed, {status.how}" if status.installed else f"NOT installed here: {status.how}"
            hint = f"; {target.install_hint}" if not status.installed and target.install_hint else ""
            print(f"  provider: {status.name} ({state}{hint})")
        print(f"  activations: {', '.join(target.activation_types)} (default {target.default_activation_type}, "
              f"{'symmetric' if target.activation_symmetric else 'asymmetric'}); weights: {', '.join(target.weight_types)} "
              f"({'per channel' if target.weight_per_channel else 'per tensor'}, symmetric)")
        print(f"  quantized ops: {', '.join(sorted(target.rules))}")
        if target.quantize_all:
            print("  plan: every listed op is quantized wherever its inputs can be (nothing left in float between them)")
        fixed = target.summary()["fixed_output_encodings"]
        if fixed:
            print("  fixed output encodings: " + "; ".join(
                f"{op} " + ", ".join(f"{t} scale {s:.6g} zp {z}" for t, (s, z) in encodings.items())
                for op, encodings in fixed.items()))
        if not target.int32_bias:
            print(f"  biases: float initializers (no int32 DequantizeLinear kernel on {target.kernels.provider})")
        for warning in target.warnings:
            print(f"  warning: {warning}")
    return 0


def _cmd_run(args) -> int:
    import numpy as np

    from qcompile.backends import get_target
    from qcompile.errors import ModelError
    from qcompile.io.providers import open_session, placement, placement_summary

    target = get_target(args.target)
    if not Path(args.model).is_file():
        raise ModelError(f"Model file {args.model!r} does not exist.")
    session = open_session(args.model, target, allow_fallback=args.allow_fallback)
    rows = placement(session)
    summary = placement_summary(rows, target.providers[0])
    print(f"{args.model} on {target.name}: {summary['on_provider']} of {summary['nodes']} nodes on {summary['provider']}"
          + "".join(f", {count} on {name}" for name, count in summary["by_provider"].items() if name != summary["provider"]))
    for row in rows if args.nodes else summary["off_provider"]:
        print(f"  {row['provider']:28s} {row['op_type']:20s} {row['name']}")
    feed = _run_inputs(args.inputs, session, np)
    outputs = session.run(None, feed)
    for meta, value in zip(session.get_outputs(), outputs):
        value = np.asarray(value)
        stats = (f", min {value.min():.6g}, max {value.max():.6g}, mean {value.mean():.6g}"
                 if value.size and np.issubdtype(value.dtype, np.number) else "")
        print(f"  output {meta.name}: {value.dtype} {list(value.shape)}{stats}")
    if args.per_op:
        _print_op_fidelity(args, target, feed)
    return 0


def _print_op_fidelity(args, target, feed) -> None:
    import onnx

    from qcompile.analysis.op_fidelity import op_fidelity

    result = op_fidelity(onnx.load(args.model), target, [feed], allow_fallback=args.allow_fallback)
    print(f"per op: each QDQ node unit alone on the CPU reference's input codes, {result['provider']} vs "
          "the CPU provider running the QDQ model as written; output codes within 1 step")
    print(f"  {'op type':34s} {'units':>5s} {'mean':>8s} {'worst':>8s} {'max steps':>9s}")
    for op_type, entry in result["by_op_type"].items():
        print(f"  {op_type:34s} {entry['units']:5d} {entry['mean_within_1_step']:8.2%} "
              f"{entry['worst_within_1_step']:8.2%} {entry['max_steps']:9.0f}")
    print(f"  {'op type':20s} {'within 1':>8s} {'max steps':>9s} {'end to end':>10s}  node")
    for row in result["units"]:
        print(f"  {row['op_type']:20s} {row['within_1_step']:8.2%} {row['max_steps']:9.0f} "
              f"{row['coupled_within_1_step']:10.2%}  {row['node']}")
    for model, off in result["placement"]["off_provider"].items():
        if off:
            print(f"  ({model} analysis model: {len(off)} node(s) off {result['provider']})")


def _run_inputs(path: str | None, session, np) -> dict:
    from qcompile.errors import CalibrationDataError

    inputs = session.get_inputs()
    if path is None:
        # No inputs given: random data of the model's shapes (the placement is the point).
        rng = np.random.default_rng(0)
        feed = {}
        for meta in inputs:
            if not all(isinstance(d, int) for d in meta.shape):
                raise CalibrationDataError(
                    f"Input {meta.name!r} has dynamic shape {meta.shape}; pass --inputs sample.npz with its arrays."
                )
            name = meta.type[len("tensor("):-1]
            dtype = np.dtype({"float": "float32", "double": "float64"}.get(name, name))
            feed[meta.name] = (rng.normal(size=meta.shape) if dtype.kind == "f" else np.zeros(meta.shape)).astype(dtype)
        return feed
    from qcompile.io.data import read_npz

    feed = read_npz(Path(path), label="--inputs")
    missing = [meta.name for meta in inputs if meta.name not in feed]
    if missing:
        raise CalibrationDataError(f"--inputs {path!r} lacks {', '.join(missing)}; its arrays are: {', '.join(feed)}.")
    return {meta.name: feed[meta.name] for meta in inputs}


def _cmd_debug(args) -> int:
    from qcompile.analysis.debug import DEFAULT_GROUP_SIZE, analyze
    from qcompile.io.outputs import check_destination, files_read, write_text_atomically

    # Neither report may replace a file the analysis reads: checked before the analysis, which can take long.
    reads = [*files_read(model=args.float_model, calibration=args.data), (Path(args.quant_model), "the quantized model"),
             *([(Path(args.data), "the data file")] if Path(args.data).is_file() else [])]
    for path, flag in ((args.out, "--out"), (args.json_path, "--json")):
        if path:
            check_destination(Path(path), reads=reads, flag=flag)
    show = not args.quiet and sys.stderr.isatty()

    def progress(line: str) -> None:
        print(f"\rdebug: {line}\033[K", end="", file=sys.stderr, flush=True)

    report = analyze(
        args.float_model, args.quant_model, args.data, group_size=args.group_size or DEFAULT_GROUP_SIZE,
        max_batches=args.max_batches, threads=args.threads, progress=progress if show else None,
    )
    if show:
        print(file=sys.stderr)
    if args.out:
        write_text_atomically(Path(args.out), report.to_html(top=max(args.top, 20)), reads=reads, flag="--out")
    if args.json_path:
        write_text_atomically(Path(args.json_path), report.to_json(), reads=reads, flag="--json")
    if not args.quiet:
        print(report.text_table(args.top))
        for path in (args.out, args.json_path):
            if path:
                print(f"wrote {path}")
    return 0


def _cmd_sensitivity(args) -> int:
    from qcompile.api import resolve_config
    from qcompile.io.outputs import check_destination, files_read, write_text_atomically
    from qcompile.analysis.sensitivity import node_sensitivity

    overrides = {k: v for k, v in (("target", args.target), ("executor", args.executor), ("workers", args.workers),
                                   ("ray_address", args.ray_address)) if v is not None}
    config = resolve_config(args.config, **overrides)
    reads = files_read(model=args.model, calibration=args.calib, evaluation=args.eval_data, config=args.config,
                       metric=args.metric)
    if args.json_path:  # before the analysis, which compiles once per node
        check_destination(Path(args.json_path), reads=reads, flag="--json")
    rows, summary = node_sensitivity(args.model, args.calib, config=config, eval_data=args.eval_data,
                                     metric=args.metric, nodes=args.nodes)
    if args.json_path:
        write_text_atomically(Path(args.json_path), json.dumps({"summary": summary, "nodes": rows}, indent=2) + "\n",
                              reads=reads, flag="--json")
    if not args.quiet:
        scored = args.metric is not None
        print(f"compiled: worst output SQNR {_db(summary['compiled_min_sqnr_db'])}"
              + (f", score {summary['compiled_score']:.6g} (float {summary['float_score']:.6g})" if scored else "")
              + f"; {summary['nodes']} nodes, {summary['seconds']:.1f} s on {summary['executor']}"
              + (f" ({summary['workers']} workers)" if summary["executor"] != "inprocess" else ""))
        print(f"{'node':<40} {'op':<14} {'SQNR if float':>14} {'gain':>8}" + (f" {'score if float':>15}" if scored else ""))
        for row in rows[: args.top]:
            line = (f"{row['node'][:40]:<40} {row['op_type']:<14} {_db(row['min_sqnr_db_if_float']):>14} "
                    f"{_db(row['gain_db']):>8}")
            if scored:
                line += f" {row['score_if_float']:>15.6g}" if row.get("score_if_float") is not None else f" {'-':>15}"
            print(line + (f"  ({row['error']})" if "error" in row else ""))
        if args.json_path:
            print(f"wrote {args.json_path}")
    return 0


def _cmd_perplexity(args) -> int:
    from qcompile.analysis.language_model import load_session_and_tokenizer, perplexity
    from qcompile.io.causal_lm import text_batches

    session, _ = load_session_and_tokenizer(Path(args.model), _tokenizer_source(args), args.threads)
    source = _tokenizer_source(args) or (Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent)
    windows = [b["input_ids"] for b in text_batches(source, Path(args.text), windows=args.windows, tokens=args.window)]
    value = perplexity(session, windows)
    print(f"perplexity {value:.4f} over {len(windows)} windows of {windows[0].shape[1]} tokens of {args.text}")
    if args.reference:
        from qcompile.analysis.language_model import next_token_agreement

        reference, _ = load_session_and_tokenizer(Path(args.reference), source, args.threads)
        agreement = next_token_agreement(session, reference, windows)
        print(f"reference perplexity {perplexity(reference, windows):.4f}; KL divergence {agreement['kl_divergence']:.5f} "
              f"nats a token; top-1 agreement {100 * agreement['top1_agreement']:.2f} % of {agreement['positions']} positions")
    return 0


def _cmd_generate(args) -> int:
    from qcompile.analysis.language_model import generate, load_session_and_tokenizer

    import numpy as np

    session, tokenizer = load_session_and_tokenizer(Path(args.model), _tokenizer_source(args), args.threads)
    prompt = np.asarray([tokenizer(args.prompt, add_special_tokens=False)["input_ids"]], dtype=np.int64)
    new = generate(session, prompt, args.max_new_tokens, tokenizer.eos_token_id)
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    return 0


def _tokenizer_source(args) -> Path | None:
    return Path(args.tokenizer) if args.tokenizer else None


def _cmd_build(args) -> int:
    """Exit code: the worst entry's, in order of severity 0 (ok) < 3 (accuracy gate failed) < 2 (bad
    input) < 1 (a bug); a bad build file exits 2 before anything compiles."""
    from qcompile.scaleout.build import build, load_build_file

    if args.dry_run:
        plan = load_build_file(args.build_file, args.out_dir, cache=True)
        for entry in plan.entries:
            print(f"{entry.name}.{entry.target}: {entry.model} (calib {entry.calib}) -> {entry.output}")
        print(f"{len(plan.entries)} entries; the build file is valid")
        return 0
    # The pass cache is on for the command line unless an entry's config turns it off.
    report = build(args.build_file, args.out_dir, executor=args.executor, workers=args.workers or 0,
                   ray_address=args.ray_address, cache=True)
    lines = report.lines()
    if not args.quiet:
        print("\n".join(lines))
    else:  # -q: errors only, the entries that failed
        for entry, line in zip(report.entries, lines):
            if entry["exit_code"]:
                print(f"qcompile: {line}", file=sys.stderr)
    return report.exit_code


def _db(value) -> str:
    return "-" if value is None else f"{value:.2f} dB"


def _cmd_inspect(args) -> int:
    from qcompile.backends import get_target
    from qcompile.core.config import CompileConfig
    from qcompile.core.context import CompileContext
    from qcompile.io.data import input_specs
    from qcompile.io.loader import load_model, refuse_non_finite_weights, refuse_quantized
    from qcompile.core.pipeline import parse_pipeline, run_pipeline

    model = load_model(args.model)
    refuse_quantized(model, repr(str(args.model)))
    refuse_non_finite_weights(model, repr(str(args.model)))
    target = get_target(args.target)
    info = {
        "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape or [])} for s in input_specs(model)],
        "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])]}
                    for v in model.graph.outputs],  # a static dim is a number, a symbolic one its name
        "opset": dict(model.opset_imports),
        "nodes": len(model.graph),
        "op_types": dict(Counter(n.op_type for n in model.graph).most_common()),
        "parameters": int(sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)),
    }
    # What would be quantized: the target's pipeline up to the plan, without the passes that need data.
    from qcompile.passes import registered_passes

    pipeline = list(target.default_pipeline)
    passes = registered_passes()
    specs = [s for s in parse_pipeline(pipeline[: pipeline.index("plan-quantization") + 1])
             if not passes[s.name].needs_data]
    context = CompileContext(config=CompileConfig(target=target.name), target=target)
    run_pipeline(model, specs, context)
    plan = context.analyses.plan.summary()
    info["would_quantize"] = {k: plan[k] for k in ("quantized_nodes", "quantized_by_op_type", "quantized_weights")}
    info["would_stay_float"] = plan["float_tensors"]
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{args.model}: {info['nodes']} nodes, {info['parameters']:,} parameters, opset {info['opset']}")
    for spec in info["inputs"]:
        print(f"  input  {spec['name']}: {spec['dtype']} {spec['shape']}")
    for spec in info["outputs"]:
        print(f"  output {spec['name']}: {spec['dtype']} {spec['shape']}")
    print("  ops: " + ", ".join(f"{k} {v}" for k, v in info["op_types"].items()))
    q = info["would_quantize"]
    print(f"  would quantize for {target.name}: {q['quantized_nodes']} nodes "
          f"({', '.join(f'{k} {v}' for k, v in q['quantized_by_op_type'].items())}), {q['quantized_weights']} weights")
    if info["would_stay_float"]:
        print(f"  stays float: {', '.join(sorted(info['would_stay_float']))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from qcompile.log import setup_logging

    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet contradict each other; give one of them.")
    setup_logging(verbosity=1 if args.verbose else -1 if args.quiet else 0, log_format=args.log_format)
    commands = {"compile": _cmd_compile, "run": _cmd_run, "passes": _cmd_passes, "config": _cmd_config, "targets": _cmd_targets,
                "inspect": _cmd_inspect, "verify": _cmd_verify, "debug": _cmd_debug,
                "sensitivity": _cmd_sensitivity, "build": _cmd_build, "perplexity": _cmd_perplexity,
                "generate": _cmd_generate}
    try:
        with _sigterm_interrupts():
            return commands[args.command](args)
    except QcompileError as error:
        _error(args, str(error), error=type(error).__name__, exit_code=error.exit_code)
        return error.exit_code
    except Terminated:
        _error(args, "interrupted (SIGTERM)", exit_code=143)
        return 143
    except KeyboardInterrupt:
        _error(args, "interrupted", exit_code=130)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`qcompile inspect --json | head`): nothing more to tell it.
        # Point stdout at /dev/null so that the interpreter's own flush at exit does not fail too.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception:  # a bug: show everything so it can be reported
        if args.log_format == "json":
            logger.exception("internal error (a bug in qcompile): please report it with the exception", extra={"exit_code": 1})
            return 1
        traceback.print_exc()
        print("qcompile: internal error (a bug in qcompile): please report it with the traceback above.", file=sys.stderr)
        return 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like SIGINT's KeyboardInterrupt: every ``finally``
    runs (temp files removed, workers stopped) and the run ends with one clean line."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises ``Terminated`` while a command runs (only the main thread can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error(args, message: str, **fields) -> None:
    """The one line an error gets on stderr: ``qcompile: error: ...``, or a JSON log record."""
    if args.log_format == "json":
        logger.error(message, extra=fields)
    else:
        print(f"qcompile: {'error: ' if 'error' in fields else ''}{message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
