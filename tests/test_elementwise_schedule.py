"""Memory-bound kernels (quantize, pools, adds left unfused) are vectorized, and shared over
the cores only when there is enough work: waking the pool and waiting at its barrier costs a
few microseconds, more than a small kernel's whole run (ResNet-20's input quantize and
classifier)."""
from __future__ import annotations

import pytest
from tvm import te

from schedules.elementwise import PARALLEL_MIN_WORK, schedule_memory_bound
from schedules.targets import resolve
from topi_ops import elementwise


@pytest.mark.parametrize("hw,shared", [(16, False), (224, True)])
def test_small_kernels_stay_on_one_core(hw, shared):
    x = te.placeholder((1, 3, hw, hw), "float32", name="x")
    func = te.create_prim_func([x, elementwise.quantize(x, -5, 8, layout="NHWC")])
    script = schedule_memory_bound(func, resolve({"kind": "llvm", "num-cores": 2})).script()
    assert (3 * hw * hw >= PARALLEL_MIN_WORK) == shared
    assert ("T.parallel" in script) == shared, script
    assert "T.vectorized" in script
