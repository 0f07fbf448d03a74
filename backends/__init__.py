"""Targets: one module per execution provider, each a table of rules (see ``base.Target``)."""

from __future__ import annotations

__all__ = ["get_target", "available_targets", "Target"]

from qcompile.backends import cpu, cuda, openvino, qnn, tensorrt
from qcompile.backends.base import Target
from qcompile.errors import ConfigError

_TARGETS: dict[str, Target] = {
    t.name: t for t in (cpu.TARGET, qnn.TARGET, openvino.TARGET, tensorrt.TARGET, cuda.TARGET)
}


def available_targets() -> dict[str, Target]:
    return dict(_TARGETS)


def get_target(name: str) -> Target:
    try:
        return _TARGETS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown target {name!r}. Known targets: {', '.join(_TARGETS)} "
            "(`qcompile targets` lists them with their rules)."
        ) from None
