"""The compile configuration: one validated dataclass, loadable from ``qcompile.toml``.

Every CLI flag maps onto one field here; an unknown key is an error that suggests the closest
valid one, never a warning.
"""

from __future__ import annotations

__all__ = ["NON_BUILD_KEYS", "RUN_KEYS", "CompileConfig", "load_config", "read_toml"]

import dataclasses
import difflib
import math
import tomllib
from pathlib import Path
from typing import Any

from qcompile.errors import ConfigError
from qcompile.scaleout.executors import RAY_WORKERS_LIMIT, check_machine_bound
from qcompile.numerics.qparams import QUANT_TYPES
from qcompile.numerics.statistics import CALIBRATION_METHODS


@dataclasses.dataclass
class CompileConfig:
    """Options of one compilation. ``None`` means "the target's default"."""

    # Where the model will run (`qcompile targets`): cpu, qnn-htp.
    target: str = "cpu"
    # Pipeline: pass names with options, e.g. ["shape-inference", "calibrate(method=percentile)"].
    pipeline: list[str] | None = None
    # Or a named pipeline (qcompile.core.recipes): llm-int4, llm-int8-weight, llm-w8a8.
    recipe: str | None = None
    # Activation type (the target's default when unset): uint8, int8, uint16, int16, float8e4m3fn, ...
    activation_type: str | None = None
    # Mixed precision: regular expression over activation tensor names -> activation type for the
    # tensors it matches (the first matching entry wins), e.g. {"^add_|^linear_5" = "uint16"}.
    activation_type_overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    # Weight type, activation symmetry and per-channel weights (the target's defaults when unset).
    weight_type: str | None = None
    activation_symmetric: bool | None = None
    per_channel: bool | None = None
    # How activation ranges are fixed from the calibration data: mse, minmax, percentile, entropy, or
    # auto (per tensor, the one whose range quantizes its calibration values with the least error);
    # percentile: the percentile of |x| that percentile calibration keeps.
    calibration_method: str = "mse"
    percentile: float = 99.999
    # Nodes left in float: exact node names, op types, or regular expressions over node names.
    exclude_nodes: list[str] = dataclasses.field(default_factory=list)
    exclude_op_types: list[str] = dataclasses.field(default_factory=list)
    exclude_regex: list[str] = dataclasses.field(default_factory=list)
    # Quantize MatMuls whose both inputs are activations (attention scores); weights are always quantized.
    quantize_activation_matmul: bool = True
    # Accuracy-recovery passes added to the pipeline (qcompile.core.recipes.ACCURACY_PASSES says where):
    # cross-layer-equalization, bias-correction, adaround, gptq-rounding.
    cross_layer_equalization: bool = False
    bias_correction: bool = False
    adaround: bool = False
    gptq_rounding: bool = False
    # A tensor whose calibrated magnitude reaches this is a mask or sentinel, not a signal: it stays float.
    sentinel_threshold: float = 1e6
    # Evaluation: at most this many held-out batches; latency measured with this many timed runs.
    eval_batches: int = 8
    latency_runs: int = 20
    measure_latency: bool = True
    # Accuracy gate: fail (exit code 3) when any output's SQNR is below this many dB.
    min_sqnr: float | None = None
    # Accuracy budget (qcompile.analysis.accuracy_search): compile the cheapest model within it, trying the
    # accuracy passes, then 16-bit, then float for the most sensitive tensors. max_loss: relative loss
    # ("1%" or 0.01) on metric ("module.py:function", higher is better) or, without a metric, on the
    # outputs' RMS error; search: let min_sqnr drive the search; time_budget: seconds it may take.
    max_loss: str | float | None = None
    metric: str | None = None
    search: bool = False
    time_budget: float | None = None
    # Recovery, the command line's default (qcompile.analysis.accuracy_search.compile_or_recover): when the
    # plain compile's worst output SQNR on the evaluation batches is below recover_min_sqnr dB, the
    # accuracy search runs for it (as --search would) within recover_time_budget seconds, and the
    # compile exits 3 if the floor is still missed. recover = false (--no-recover): ship the plain
    # compile whatever its accuracy. Off when min_sqnr, search or max_loss say otherwise.
    recover: bool = True
    recover_min_sqnr: float = 20.0
    recover_time_budget: float = 100.0
    # Between the floor and recover_target_sqnr dB, the compile tries 16-bit activations for the
    # tensors whose rounding costs the outputs most (the first, then the next two) and keeps them
    # only where the worst output SQNR gains at least 1 dB; the report says what it tried and
    # kept. A target at or below recover_min_sqnr turns it off.
    recover_target_sqnr: float = 30.0
    # Intra-op threads for ONNX Runtime sessions qcompile creates (0: ORT's default).
    threads: int = 0
    # Static input shapes for targets that need them (fix-shapes), e.g. {"x": [1, 3, 224, 224]};
    # empty: the first calibration batch's shapes.
    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # Targets that promise full offload fail the compile when a node would run on the CPU
    # provider; true: compile anyway and report the nodes that fall back.
    allow_fallback: bool = False
    # qnn-htp: also write the EP-context model (the precompiled QNN context binary beside it, in
    # <name>_qnn.bin) to this path, so the device does not compile the graph at load time.
    ep_context_path: str | None = None
    # Pass cache (qcompile.core.cache): reuse the results of passes already run on the same model, data,
    # config and versions, e.g. calibration when only a later pass's options changed. The output is
    # byte-identical either way. None: on for the command line, off for the Python API (a library
    # call writes no cache unless asked). cache_dir None: $QCOMPILE_CACHE_DIR, else ~/.cache/qcompile.
    # Least recently used entries are deleted to keep the cache under cache_max_mb megabytes. The
    # default, 2000 (2 GB), holds about 20 ResNet-18 compiles (~92 MB each) or a few LLM ones.
    cache: bool | None = None
    cache_dir: str | None = None
    cache_max_mb: int = 2_000
    # Where repeated work runs (qcompile.scaleout.executors): inprocess (default), local (workers processes on
    # this machine; 0: one per core) or ray (a Ray cluster at ray_address, e.g. "auto" or
    # "ray://head:10001"; none: a local Ray). Sharded calibration, the accuracy search's candidates
    # and the sensitivity analysis use it; the compiled model is byte-identical on every executor.
    executor: str = "inprocess"
    workers: int = 0
    ray_address: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for field in ("activation_type", "weight_type"):
            value = getattr(self, field)
            if value is not None and value not in QUANT_TYPES:
                raise ConfigError(
                    f"{field} = {value!r} is not a known type. Use one of: {', '.join(QUANT_TYPES)}."
                )
        for pattern, value in self.activation_type_overrides.items():
            if value not in QUANT_TYPES:
                raise ConfigError(
                    f"activation_type_overrides[{pattern!r}] = {value!r} is not a known type. "
                    f"Use one of: {', '.join(QUANT_TYPES)}."
                )
        self._validate_float8()
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibration_method = {self.calibration_method!r} is not a known method. "
                f"Use one of: {', '.join(CALIBRATION_METHODS)}."
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile = {self.percentile} must be in (50, 100], e.g. 99.999.")
        if self.eval_batches < 1:
            raise ConfigError(
                f"eval_batches = {self.eval_batches} must be >= 1: the report's accuracy, the accuracy gate and "
                "recovery are measured on the evaluation batches."
            )
        if self.latency_runs < 1:
            raise ConfigError(f"latency_runs = {self.latency_runs} must be >= 1; to skip latency, set measure_latency = false.")
        if self.cache_max_mb < 1:
            raise ConfigError(
                f"cache_max_mb = {self.cache_max_mb} must be at least 1; to turn the cache off, set "
                "cache = false (--no-cache)."
            )
        if self.executor not in ("inprocess", "local", "ray"):
            raise ConfigError(f"executor = {self.executor!r}: choose inprocess, local or ray.")
        if self.workers < 0:
            raise ConfigError(f"workers = {self.workers} must be >= 0 (0: one per core, or the Ray cluster's CPUs).")
        if self.workers and self.executor == "inprocess":
            raise ConfigError(f"workers = {self.workers} needs executor = 'local' or 'ray' (--executor local).")
        if self.ray_address is not None and self.executor != "ray":
            raise ConfigError(f"ray_address = {self.ray_address!r} needs executor = 'ray' (--executor ray).")
        if self.recover_time_budget <= 0:
            raise ConfigError(f"recover_time_budget = {self.recover_time_budget} must be a positive number of seconds.")
        if self.threads < 0:
            raise ConfigError(f"threads = {self.threads} must be >= 0 (0: ONNX Runtime's default).")
        check_machine_bound("threads", self.threads, "ONNX Runtime threads")
        if self.executor == "local":
            check_machine_bound("workers", self.workers, "worker processes")
        elif self.workers > RAY_WORKERS_LIMIT:
            raise ConfigError(f"workers = {self.workers}: give at most {RAY_WORKERS_LIMIT} Ray tasks at once.")
        for field in ("min_sqnr", "percentile", "sentinel_threshold", "time_budget", "recover_min_sqnr",
                      "recover_time_budget", "max_loss"):
            value = getattr(self, field)
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"{field} = nan is not a number: no measurement can pass or fail it. Give a number.")

    def _validate_float8(self) -> None:
        """FP8 activations go with FP8 weights and FP8 overrides, integer ones with integer ones: no
        runtime has a kernel that mixes the two (TensorRT's FP8 GEMMs read FP8 on both sides).
        Unset types are the target's default, which is an integer type on every target."""
        def is_float8(name: str | None) -> bool:
            return name is not None and QUANT_TYPES[name].is_float

        activation, weight = is_float8(self.activation_type), is_float8(self.weight_type)
        if activation != weight:
            fp8_field, other_field = ("activation_type", "weight_type") if activation else ("weight_type", "activation_type")
            other = repr(getattr(self, other_field)) if getattr(self, other_field) else "the target's integer default"
            raise ConfigError(
                f"{fp8_field} = {getattr(self, fp8_field)!r} with {other_field} = {other}: FP8 and integer "
                f"formats cannot be mixed. Set {other_field} to an FP8 type too (float8e4m3fn or float8e5m2)."
            )
        for pattern, value in self.activation_type_overrides.items():
            if is_float8(value) != activation:
                raise ConfigError(
                    f"activation_type_overrides[{pattern!r}] = {value!r} mixes FP8 and integer activations "
                    f"(activation_type = {self.activation_type!r}); overrides must use the same family."
                )
        if activation and self.activation_symmetric is False:
            raise ConfigError(
                "activation_symmetric = false with FP8 activations: an FP8 zero point must be 0, so FP8 "
                "is always symmetric. Leave activation_symmetric unset."
            )
        if activation and self.calibration_method == "entropy":
            raise ConfigError(
                "calibration_method = 'entropy' assumes an evenly spaced integer grid, which FP8 is not. "
                "Use 'mse' (searched over the FP8 grid), 'minmax' or 'percentile'."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> CompileConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"Unknown key {key!r} in {source}.{hint} Valid keys: {', '.join(fields)}."
                )
        for key, value in values.items():
            _check_type(key, value, fields[key].type, source)
        return cls(**values)

    def replace(self, **changes: Any) -> CompileConfig:
        return CompileConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that cannot change the compiled model: how it is evaluated, gated and cached, and which other
# files are written. pipeline and recipe are replaced by the resolved pipeline text. Everything else
# is part of a compile's identity: its config hash and its pass-cache keys (a pass may read these only
# where its output does not depend on them: the executor and the thread count change where and how
# fast work runs, not its result; tests/test_executors.py checks the bytes).
NON_BUILD_KEYS = frozenset({
    "pipeline", "recipe", "latency_runs", "measure_latency", "min_sqnr", "allow_fallback", "ep_context_path",
    "max_loss", "metric", "search", "time_budget", "recover", "recover_min_sqnr", "recover_time_budget",
    "cache", "cache_dir", "cache_max_mb", "executor", "workers", "ray_address", "threads",
})
# The non-build keys a pass may read: how and where its work runs, never what it computes.
RUN_KEYS = frozenset({"executor", "workers", "ray_address", "threads"})


_TYPE_CHECKS = {
    "str": (str,),
    "str | float": (str, int, float),
    "bool": (bool,),
    "int": (int,),
    "float": (int, float),
    "list[str]": (list,),
    "dict[str, list[int]]": (dict,),
    "dict[str, str]": (dict,),
}


def _check_type(key: str, value: Any, annotation: str, source: str) -> None:
    if value is None and "None" in annotation:
        return
    base = annotation.replace(" | None", "")
    expected = _TYPE_CHECKS.get(base)
    ok = expected is not None and isinstance(value, expected) and not (
        base in ("int", "float") and isinstance(value, bool)
    )
    if ok and base == "list[str]":
        ok = all(isinstance(item, str) for item in value)
    if ok and base == "dict[str, str]":
        ok = all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if ok and base == "dict[str, list[int]]":
        ok = all(
            isinstance(k, str) and isinstance(v, list) and v
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)
            for k, v in value.items()
        )
    if not ok:
        raise ConfigError(f"{key} in {source} must be {base}, got {value!r}.")


def load_config(path: str | Path) -> CompileConfig:
    """Read a ``qcompile.toml``: top-level keys are CompileConfig fields."""
    return CompileConfig.from_dict(read_toml(Path(path), "Config file"), source=str(path))


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's table, or a ConfigError that says what is wrong with ``what`` (e.g. "Build file")."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {str(path)!r} is a directory; give the .toml file in it.") from None
    except OSError as error:
        raise ConfigError(f"Cannot read {what.lower()} {str(path)!r}: {error.strerror or error}.") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text: {error}.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {error}.") from None
    except RecursionError:
        raise ConfigError(
            f"{what} {str(path)!r} nests arrays or tables too deeply to read (thousands of levels); "
            "no qcompile key takes more than two levels."
        ) from None
