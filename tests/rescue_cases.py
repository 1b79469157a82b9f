"""The rescue benchmark's smallest cases, checked the same way on each Keras backend.

`benchmarks/autoclip_rescue.py` has every model; docs/CLIPPING.md its table.
"""

import importlib.util
import pathlib

import numpy as np


def rescue_benchmark():
    """`benchmarks/autoclip_rescue.py`, imported as a module."""
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "autoclip_rescue.py"
    spec = importlib.util.spec_from_file_location("autoclip_rescue", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_smallest_rescue_cases():
    """AutoClip meets the benchmark's targets on its fastest models, one epoch each."""
    bench = rescue_benchmark()
    # A ReLU MLP whose first SGD step ruins it: NaN without clipping.
    final = {arm: bench.train("relu_mlp_big_init", arm, epochs=1)[:2]
             for arm in ("none", "static 0.1", "static 1", "static 10", "AutoClip()")}
    assert final["none"][0] == np.inf
    best_static = min(final[arm][0] for arm in bench.STATIC)
    loss, on = final["AutoClip()"]
    assert on == 0 and np.isfinite(loss) and loss <= 1.5 * best_static, final
    # A healthy SGD MLP: AutoClip never switches on, and training is exactly what it is without it.
    (plain, _, _), (clipped, on, clip) = (bench.train("tanh_mlp_sgd", arm, epochs=1) for arm in ("none", "AutoClip()"))
    assert on is None and clipped == plain and clip.state()["clipped"] == 0
