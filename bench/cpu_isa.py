"""Whether the f32 CPU runtime's speed-up over plain torchvision depends on the CPU's vector instructions.

    python bench/cpu_isa.py [--variant fasterrcnn_resnet50_fpn] [--isa AVX2] [--rounds 3]

Runs twice, each in a fresh process: once as the CPU is, once with both sides held to `--isa`. The cap is oneDNN's
own (`ONEDNN_MAX_CPU_ISA`: the convolutions of PyTorch's eager path and of OpenVINO's CPU plugin both come from
oneDNN) plus ATen's (`ATEN_CPU_CAPABILITY`: PyTorch's other kernels), so an AVX-512 machine shows what an AVX2 pod
of the same cores would. Rows per run: plain torchvision eager fp32 at batch 1 and `adapter.predict` with
`cpu_runtime` openvino in f32, end to end, interleaved, median seconds per image (`bench/cpu_deploy.py`'s images
and helpers). bf16 and int8 are left out: a cap below AVX-512 takes their units away. About 3 minutes on a quiet
2-core machine (bench/RESULTS.md).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def measure(variant: str, rounds: int) -> None:
    """This process's rows, as the ISA it was started with allows."""
    import torch
    import cpu_deploy
    images = [cpu_deploy.photo_like(h, w, seed) for seed, (h, w) in enumerate(cpu_deploy.SIZES)]
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, 'model')
        torch.manual_seed(0)
        cpu_deploy.make_adapter(variant, '/nonexistent', 'torch').save(folder)
        adapter = cpu_deploy.make_adapter(variant, folder, 'openvino')
        rows = {'plain torchvision eager fp32': cpu_deploy.plain_torchvision(variant, adapter),
                'adapter.predict, openvino f32': lambda image: adapter.predict([image])}
        for fn in rows.values():  # warm-up: the export and compile
            fn(images[0])
        times = {name: [] for name in rows}
        for _ in range(rounds):
            for image in images:
                for name, fn in rows.items():
                    began = time.perf_counter()
                    fn(image)
                    times[name].append(time.perf_counter() - began)
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians['plain torchvision eager fp32']
    cap = os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')
    print(f'ISA cap {cap} (torch kernels: {torch.backends.cpu.get_cpu_capability()}), load average '
          f'{" ".join(f"{v:.2f}" for v in os.getloadavg())}:')
    for name, value in medians.items():
        print(f'  {name:32s} {value:7.3f} s  {reference / value:5.2f}x', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variant', default='fasterrcnn_resnet50_fpn')
    parser.add_argument('--isa', default='AVX2', help="oneDNN's name for the cap: AVX2, AVX512_CORE, ...")
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--measure', action='store_true', help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.measure:
        return measure(args.variant, args.rounds)
    import cpu_deploy  # torch and OpenVINO are imported in the children, where the cap is set before them
    print(f'CPU: {cpu_deploy.cpu_name()}; {args.variant}, median of {args.rounds} rounds of '
          f'{len(cpu_deploy.SIZES)} images, seconds per image and speed-up over plain torchvision', flush=True)
    command = [sys.executable, os.path.abspath(__file__), '--measure', '--variant', args.variant,
               '--rounds', str(args.rounds)]
    for cap in (None, args.isa):
        env = dict(os.environ)
        if cap:
            isa = cap.upper()
            aten = 'avx2' if isa.startswith('AVX2') else 'avx512' if isa.startswith('AVX512') else 'default'
            env.update(ONEDNN_MAX_CPU_ISA=cap.upper(), ATEN_CPU_CAPABILITY=aten)
        subprocess.run(command, env=env, check=True)


if __name__ == '__main__':
    main()
