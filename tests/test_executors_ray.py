"""The executor tests of tests/test_executors.py that take ``parallel``, run on a local Ray
(``ray.init(num_cpus=2)``). A module of their own: Ray is up only while they run, never while the
local-process tests fork workers or keep both cores busy."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'qcompile[ray]'")

import test_executors  # noqa: E402
from test_executors import (  # noqa: E402,F401 - collected here again, with this module's ``parallel``
    cnn_calib,
    test_a_killed_worker_loses_only_its_task_which_is_retried,
    test_accuracy_search_is_the_same_on_every_executor,
    test_compiled_model_is_byte_identical_on_every_executor,
    test_map_keeps_item_order_sends_shared_once_and_splits_threads,
    test_node_sensitivity_is_the_same_on_every_executor,
    test_the_users_error_comes_back_as_itself,
)

from qcompile.scaleout.executors import make_executor  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    # The tests' task functions are not importable by name in Ray's workers: send them by value.
    ray.cloudpickle.register_pickle_by_value(test_executors)
    yield ray
    ray.shutdown()


@pytest.fixture
def parallel(ray_local):
    executor = make_executor("ray", workers=2)
    assert executor.name == "ray"
    return executor


def test_ray_is_used_as_initialised(ray_local):
    """A Ray the caller started is used as it is, and left running when the executor closes."""
    with make_executor("ray", workers=2) as executor:
        assert executor.describe()["cluster_cpus"] == 2
    assert ray_local.is_initialized()

