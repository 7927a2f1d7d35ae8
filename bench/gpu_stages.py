"""Where a batch-16 fp16 forward spends its time, stage by stage, plain torchvision and ours in the same run.

    python bench/gpu_stages.py                       # on the GPU (about a minute on an H100)
    python bench/gpu_stages.py --device cpu --tiny   # dry run on CPU

For each network: the whole forward (median of --runs), the same forward cut at its stages
(input copy, transform, backbone + FPN, RPN, RoI heads, postprocess) with a synchronize after
each, and the device-busy time (the sum of its kernels' durations, from the profiler) with its
launch and host-sync counts. Busy time far under the forward's wall time means the host (Python,
dispatch, syncs) is the ceiling; near it, the kernels are.
"""
import os
import statistics
import sys
import tempfile

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.gpu_profile import profile_call  # noqa: E402
from bench.speed.common import bare_forward, bare_network, forward_bench  # noqa: E402
from bench.timing import seconds  # noqa: E402
from utils.inference.prediction import set_postprocess  # noqa: E402


def staged(network, images, device, half, syncs):
    """The forward of torchvision's GeneralizedRCNN, written out; `syncs` collects the time of each stage."""
    marks = []

    def mark(name):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        marks.append((name, __import__('time').perf_counter()))

    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=half):
        mark('start')
        inputs = [t.to(device, non_blocking=True).float().div_(255) for t in images]
        mark('input copy')
        sizes = [tuple(t.shape[-2:]) for t in inputs]
        image_list, _ = network.transform(inputs)
        mark('transform')
        features = network.backbone(image_list.tensors)
        mark('backbone + FPN')
        proposals, _ = network.rpn(image_list, features)
        mark('RPN')
        detections, _ = network.roi_heads(features, proposals, image_list.image_sizes)
        mark('RoI heads')
        detections = network.transform.postprocess(detections, image_list.image_sizes, sizes)
        mark('postprocess')
    for (_, before), (name, after) in zip(marks, marks[1:]):
        syncs.setdefault(name, []).append((after - before) * 1000)
    return detections


def busy(fn, device):
    """(device-busy ms, kernel launches, host syncs) of one call."""
    events = profile_call(fn, device)
    launches = sum(e.count for e in events if e.key.startswith(('cudaLaunchKernel', 'cuLaunchKernel')))
    syncs = sum(e.count for e in events if e.key.startswith(('cudaStreamSynchronize', 'cudaDeviceSynchronize')))
    kernels = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return kernels / 1000, launches, syncs


def report(name, network, images, device, half, runs):
    bare_forward(network, images, device, half)  # warm-up
    total = statistics.median(seconds(lambda: bare_forward(network, images, device, half), device) for _ in range(runs))
    stages = {}
    for _ in range(runs):
        staged(network, images, device, half, stages)
    kernels, launches, syncs = busy(lambda: bare_forward(network, images, device, half), device)
    parts = '  '.join(f'{stage} {statistics.median(ms):.1f}' for stage, ms in stages.items())
    print(f'{name}: forward {total * 1000:.1f} ms ({len(images) / total:.0f} img/s); device busy {kernels:.1f} ms, '
          f'{launches} launches, {syncs} syncs\n   stages, synchronized (ms): {parts}', flush=True)


def main():
    args, cfg, device, half, adapter, images = forward_bench(__doc__.splitlines()[0], runs=5)
    print(f'{torch.cuda.get_device_name(device) if half else "CPU"}, torch {torch.__version__}; batch 16 of '
          f'{cfg["width"]}x{cfg["height"]}, {cfg["variant"]} at {cfg["min_size"]} px, score threshold 0, '
          f'100 detections per image, {"fp16 autocast" if half else "fp32"}', flush=True)
    plain = bare_network(adapter, cfg, device)
    report('plain', plain, images, device, half, args.runs)
    report('plain channels_last', bare_network(adapter, cfg, device).to(memory_format=torch.channels_last),
           images, device, half, args.runs)
    network = adapter._inference_networks.get(adapter.model, device)
    set_postprocess(network, 0.0, adapter.settings['nms_iou_threshold'], 100)
    report('ours (inference copy: bucketed padding, batched post-processing)', network, images, device, half,
           args.runs)


if __name__ == '__main__':
    main()
