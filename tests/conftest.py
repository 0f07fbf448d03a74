import sys
from pathlib import Path

# tests/tiny_models.py builds the tiny models every test file uses.
sys.path.insert(0, str(Path(__file__).parent))

import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
import pytest  # noqa: E402
from tiny_models import tiny_cnn  # noqa: E402

from qcompile.backends import get_target  # noqa: E402
from qcompile.core.config import CompileConfig  # noqa: E402
from qcompile.core.context import CompileContext  # noqa: E402
from qcompile.io.data import BatchSource, input_specs  # noqa: E402
from qcompile.core.pipeline import parse_pipeline, run_pipeline  # noqa: E402


def run_passes(proto, pipeline, data=None, **config):
    """Run the named passes on a copy of ``proto``; return (model, context) to inspect."""
    model = ir.serde.deserialize_model(proto)
    cfg = CompileConfig(**config)
    source = BatchSource(data, input_specs(model), max_eval=0) if data is not None else None
    context = CompileContext(config=cfg, target=get_target(cfg.target), data=source)
    model, _ = run_pipeline(model, parse_pipeline(pipeline), context)
    return model, context


@pytest.fixture(autouse=True)
def pass_cache_dir(tmp_path_factory, monkeypatch):
    """Each test gets its own, empty pass cache (qcompile.core.cache), never the user's ~/.cache; subprocesses inherit it."""
    path = tmp_path_factory.mktemp("qcompile-cache")
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(path))
    return path


@pytest.fixture
def graph_changing_pass(monkeypatch):
    """Registers ``test-rename-a-node`` for one test: a pass that changes the graph (it renames the
    first node) and declares no preserved analyses."""
    from qcompile.passes import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @registry.register_pass("test-rename-a-node")
    class RenameANode(ir.passes.InPlacePass):
        def __init__(self, context):
            super().__init__()

        def call(self, model):
            next(iter(model.graph)).name = "renamed"
            return ir.passes.PassResult(model, True)

    return "test-rename-a-node"


@pytest.fixture
def model_path(tmp_path):
    """The tiny CNN saved as an .onnx file."""
    path = tmp_path / "model.onnx"
    onnx.save(tiny_cnn(), str(path))
    return path
