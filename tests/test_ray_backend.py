"""Per-matrix quantization as Ray tasks on a local Ray instance the test starts: same result as serial."""

from __future__ import annotations

import pytest
import torch

from unibcq.config import QuantConfig
from unibcq.errors import UnibcqError
from unibcq.methods import quantize_model

ray = pytest.importorskip("ray")
# One xdist worker runs the whole module, so only one Ray instance starts (Makefile: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("method", ["rtn", "bcq-alternating", "dyngroup"])
def test_ray_backend_equals_serial(local_ray, tiny_llama, method):
    config = dict(method=method, bits=1 if method == "dyngroup" else 3, group_size=-1 if method == "dyngroup" else 32,
                  max_groups=4)
    serial, distributed = tiny_llama(), tiny_llama()
    serial_records = quantize_model(serial, QuantConfig(**config), show_progress=False)
    ray_records = quantize_model(distributed, QuantConfig(**config), show_progress=False, workers=2, backend="ray")
    expected, got = serial.state_dict(), distributed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert [r.name for r in ray_records] == [r.name for r in serial_records]


def test_ray_backend_refuses_calibrated_methods(tiny_llama):
    with pytest.raises(UnibcqError, match="per-matrix methods"):
        quantize_model(tiny_llama(), QuantConfig(method="gptq"), torch.zeros(2, 8, dtype=torch.long),
                       show_progress=False, backend="ray")
