"""Auto-clipping: clip gradients only once they explode, decided inside the train step.

| name | what |
|---|---|
| `AutoClip` | the callback: armed until a spike or a non-finite gradient, then clips |
| `ZScore` | ZClip (Kumar et al. 2025): clip spikes against an EMA of the norm |
| `Percentile` | AutoClip (Seetharaman et al. 2020): clip at a percentile of recent norms |
| `AGC` | adaptive gradient clipping (Brock et al. 2021), unit-wise |
| `GlobalNorm` | a fixed threshold on the global norm |
| `SpikeGuard` | protection from the first step: spikes against the recent median, overflow, SGD's update ratio |
| `ClipSwitch` | AutoClip's whole per-step decision (guard, trigger, policy, on/off, counts) as one pure function |
| `ClipPolicy` | the base class of policies: `init`, `update`, `clip` |

See `docs/CLIPPING.md`.
"""

from keras_vg.clipping.agc import AGC
from keras_vg.clipping.autoclip import AutoClip
from keras_vg.clipping.global_norm import GlobalNorm
from keras_vg.clipping.guard import SpikeGuard
from keras_vg.clipping.percentile import Percentile
from keras_vg.clipping.policy import MAX_NORM, ClipPolicy, Decision
from keras_vg.clipping.records import write_records
from keras_vg.clipping.switch import ClipSwitch
from keras_vg.clipping.zscore import ZScore

__all__ = ["AGC", "MAX_NORM", "AutoClip", "ClipPolicy", "ClipSwitch", "Decision", "GlobalNorm", "Percentile",
           "SpikeGuard", "ZScore", "write_records"]
