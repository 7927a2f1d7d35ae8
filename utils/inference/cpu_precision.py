"""The compiled CPU runtime's arithmetic (the `cpu_precision` setting): what each runtime is asked to compute in.

f32 gives PyTorch's detections (to rounding). bf16 halves the bytes each multiply moves and runs on the bf16
units of recent CPUs (AVX-512 BF16, AMX): several times f32 there, for a small measured change in the boxes.
int8 runs the detector graph NNCF quantized at the end of training (`utils.export.int8_graphs`). OpenVINO
honours all three; ONNX Runtime's CPU provider runs the f32 graph whatever is asked (bf16 and int8 are
OpenVINO's here). Figures: bench/RESULTS.md, README "CPU runtime".
"""
import functools
from typing import Dict, Optional, Tuple

F32, BF16, INT8, AUTO = 'f32', 'bf16', 'int8', 'auto'


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether OpenVINO finds bf16 units on this CPU (its own capability list, as it decides for itself)."""
    try:
        import openvino as ov
        return 'BF16' in ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')
    except Exception:  # no OpenVINO, or it cannot tell: f32, which every CPU runs
        return False


def choose(setting: str, runtime: str) -> Tuple[str, Optional[str]]:
    """The precision `runtime` runs for `setting`, and a line saying why it is not the one asked (else None)."""
    if runtime != 'openvino':
        note = None if setting in (F32, AUTO) else \
            f'cpu_precision {setting!r} is for OpenVINO; cpu_runtime {runtime!r} computes in f32'
        return F32, note
    if setting == AUTO:
        return (BF16 if cpu_has_bf16() else F32), None
    if setting == BF16 and not cpu_has_bf16():
        return F32, 'cpu_precision \'bf16\': this CPU has no bf16 units (OpenVINO lists none), so it computes in f32'
    return setting, None


def openvino_config(precision: str) -> Dict[str, str]:
    """OpenVINO's compile settings for `precision`. LATENCY: one request uses every core, as the adapter runs one
    image at a time. The hint is explicit: on CPUs with bf16 units OpenVINO would otherwise pick bf16 itself. An
    int8 graph computes its quantized layers in int8 and the rest (`int8_graphs.F32_LAYERS`, `F32_TYPES`) in bf16
    where the CPU has the units (resnet50's graph 4.2x eager against 3.0x with that rest in f32, when the rest was
    larger: bench/RESULTS.md), else f32."""
    remainder = BF16 if precision == BF16 or (precision == INT8 and cpu_has_bf16()) else F32
    return {'PERFORMANCE_HINT': 'LATENCY', 'INFERENCE_PRECISION_HINT': remainder}
