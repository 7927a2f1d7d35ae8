"""`predict` and `embed` on the CPU through a compiled runtime (the `cpu_runtime` setting), torch as the fallback.

On a 2-vCPU pod PyTorch's eager forward is what limits a deploy; OpenVINO, compiling the same
network exported to ONNX (`utils.export.cpu_graphs`), runs it several times faster (bench/cpu_deploy.py,
bench/RESULTS.md), and ONNX Runtime is there for images where OpenVINO is not wanted. Detections are
the PyTorch model's: the graph holds the network's own resize, NMS and box scaling, each image runs
at its own size, and only the arithmetic's rounding differs (tests/test_cpu_runtime.py). `cpu_precision`
bf16 or int8 trades a measured change of the detections for speed (`utils.inference.cpu_precision`).

Failure is a fallback, never an outage: a runtime that is not installed, a graph that fails to
export or compile, or an input the graph cannot take sends the work to the torch path, with one
warning line saying why. GPUs always take the torch path (fp16, `utils.inference.prediction`).
"""
import logging
import os
import tempfile
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from utils.export import cpu_graphs
from utils.export import int8_graphs
from utils.inference import cpu_precision, int8_check, prediction
from utils.modeling.embeddings import fpn_embedding

logger = logging.getLogger(__name__)

RUNTIMES = ('openvino', 'onnxruntime', 'torch')
#: Where graphs go when the model has no local folder (a model built in memory).
FALLBACK_ROOT = os.path.join(tempfile.gettempdir(), 'fasterrcnn-cpu-runtime')


class OpenVinoGraph:
    """An ONNX file compiled by OpenVINO for this CPU; with `cache`, the compiled blob is cached beside it, so the
    next process (a new replica's first call) loads it instead of compiling again."""

    def __init__(self, path: str, precision: str = cpu_precision.F32, cache: bool = True):
        import openvino as ov
        core = ov.Core()
        if cache:
            core.set_property({'CACHE_DIR': os.path.join(os.path.dirname(path), 'openvino_cache')})
        self._compiled = core.compile_model(path, 'CPU', cpu_precision.openvino_config(precision))
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()  # one request: concurrent callers take turns

    def __call__(self, array: np.ndarray) -> List[np.ndarray]:
        with self._lock:
            results = self._request.infer({0: array})
            return [np.array(results[output]) for output in self._compiled.outputs]  # the request reuses them


class OnnxRuntimeGraph:
    """An ONNX file run by ONNX Runtime's CPU provider."""

    def __init__(self, path: str, precision: str = cpu_precision.F32):  # f32 whatever is asked (cpu_precision)
        import onnxruntime
        self._session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, array: np.ndarray) -> List[np.ndarray]:
        return self._session.run(None, {self._input: array})


GRAPH_TYPES: Dict[str, Callable[[str, str], Callable[[np.ndarray], List[np.ndarray]]]] = {
    'openvino': OpenVinoGraph, 'onnxruntime': OnnxRuntimeGraph}


def graph_rows(graph: Callable, network: nn.Module, image: torch.Tensor, score_threshold: float) -> list:
    """One image's rows [left, top, right, bottom, score, label id] from the detector graph: the boxes
    scoring above the model's threshold, scaled back to the image as torchvision does (float32 ratios)
    and clipped to it (as `prediction.detection_rows`)."""
    with torch.inference_mode():
        prepared = cpu_graphs.prepared_image(network, prediction.device_inputs([image], torch.device('cpu'))[0])
    boxes, labels, scores = graph(prepared.numpy())
    keep = scores > score_threshold
    height, width = image.shape[-2:]
    ratio = (np.array([width, height, width, height], dtype=np.float32)
             / np.array([prepared.shape[2], prepared.shape[1]] * 2, dtype=np.float32))
    boxes = np.minimum(np.maximum(boxes[keep] * ratio, 0), np.array([width, height, width, height], np.float32))
    return np.concatenate([boxes, scores[keep, None], labels[keep, None].astype(boxes.dtype)], axis=1).tolist()


def graph_vectors(graph: Callable, network: nn.Module, images: List[torch.Tensor]) -> List[List[float]]:
    """`prediction.image_vectors` with the backbone run by the graph: the network's own resize and
    padding, then its FPN levels pooled by `fpn_embedding`."""
    with torch.inference_mode():
        image_list, _ = network.transform(prediction.device_inputs(images, torch.device('cpu')))
    levels = [torch.from_numpy(level) for level in graph(image_list.tensors.numpy())]
    pooled = fpn_embedding(dict(enumerate(levels)), image_list.image_sizes, tuple(image_list.tensors.shape[-2:]))
    return pooled.tolist()


class CpuRuntime:
    """The adapter's CPU forward pass: a compiled graph per network (one per kind: detector, backbone),
    remade only when the weights or the settings frozen into it change; torch when it cannot run."""

    def __init__(self):
        self._graphs: Dict[str, Tuple[Any, Any]] = {}  # kind -> (key, graph or the reason it failed)
        self._lock = threading.Lock()
        self._warned = set()

    def detection_rows(self, network: nn.Module, images: List[torch.Tensor], device: torch.device,
                       settings: Dict[str, Any], folder: Optional[str]) -> List[list]:
        """`prediction.detection_rows` through the `cpu_runtime` graph, each image at its own size."""
        graph = self._graph(cpu_graphs.DETECTOR, network, device, settings, folder)
        if graph is not None:
            try:
                threshold = float(network.roi_heads.score_thresh)
                return [graph_rows(graph, network, image, threshold) for image in images]
            except Exception as err:  # an input the graph cannot take: this batch on torch
                self._warn(f'{settings["cpu_runtime"]} could not run this batch ({type(err).__name__}: {err}); '
                           f'it runs on torch')
        return prediction.detection_rows(network, images, device, settings['cudnn_benchmark'])

    def image_vectors(self, network: nn.Module, images: List[torch.Tensor], device: torch.device,
                      settings: Dict[str, Any], folder: Optional[str]) -> List[List[float]]:
        """`prediction.image_vectors` with the backbone run by the `cpu_runtime` graph."""
        graph = self._graph(cpu_graphs.BACKBONE, network, device, settings, folder)
        if graph is not None:
            try:
                return graph_vectors(graph, network, images)
            except Exception as err:
                self._warn(f'{settings["cpu_runtime"]} could not embed this batch ({type(err).__name__}: {err}); '
                           f'it runs on torch')
        return prediction.image_vectors(network, images, device, settings['cudnn_benchmark'])

    def _graph(self, kind: str, network: nn.Module, device: torch.device, settings: Dict[str, Any],
               folder: Optional[str]) -> Optional[Callable]:
        """The compiled graph for this network, or None: the torch path (a GPU, `torch`, or a failure)."""
        runtime = settings['cpu_runtime']
        if device.type != 'cpu' or runtime == 'torch':
            return None
        heads, rpn = network.roi_heads, network.rpn
        key = (runtime, settings['cpu_precision'], id(network), prediction.weights_version(network),
               cpu_graphs.graph_score_threshold(network),
               heads.nms_thresh, heads.detections_per_img, rpn._pre_nms_top_n['testing'],
               rpn._post_nms_top_n['testing'], folder)
        with self._lock:
            cached_key, graph = self._graphs.get(kind, (None, None))
            if cached_key != key:
                graph = self._build(kind, network, runtime, settings['cpu_precision'], folder)
                self._graphs[kind] = (key, graph)
        return None if isinstance(graph, str) else graph

    def _build(self, kind: str, network: nn.Module, runtime: str, setting: str, folder: Optional[str]):
        """The graph, or the reason it could not be made (warned once; the same weights are not retried)."""
        root = folder if folder and os.path.isdir(folder) else FALLBACK_ROOT
        try:
            path = cpu_graphs.ensure_graph(network, kind, cpu_graphs.graph_folder(root, network))
            path, precision = self._precision_graph(kind, runtime, setting, path)
            graph = GRAPH_TYPES[runtime](path, precision)
            logger.info('%s runs on %s in %s (%s)', 'predict' if kind == cpu_graphs.DETECTOR else 'embed', runtime,
                        precision, path)
            return graph
        except Exception as err:  # not installed, failed export or compile: torch, said once
            reason = f'cpu_runtime {runtime!r} is not available for {kind} ({type(err).__name__}: {err}); ' \
                     f'running on torch'
            self._warn(reason)
            return reason

    def _precision_graph(self, kind: str, runtime: str, setting: str, path: str) -> Tuple[str, str]:
        """The graph file and precision for `setting`: int8 is the detector's int8 graph beside `path` (made when the
        model was trained with it); anything that cannot be had runs f32, said once."""
        precision, note = cpu_precision.choose(setting, runtime)
        if precision == cpu_precision.INT8:
            int8 = int8_graphs.int8_path(os.path.dirname(path))
            if kind != cpu_graphs.DETECTOR:  # embed's backbone has no calibrated graph; its vectors stay f32
                precision = cpu_precision.F32
            elif os.path.isfile(int8):
                path = int8
                check = int8_check.read_check(os.path.dirname(int8))
                if check:  # what int8 cost this model, measured when the graph was made
                    logger.info('the int8 graph, measured against f32 at training %s', int8_check.describe(check))
            else:
                precision, note = cpu_precision.F32, (
                    f'cpu_precision \'int8\': the model has no int8 graph ({int8} is missing: it was trained with '
                    f'another cpu_precision, or its calibration failed), so predict runs in f32')
        if note:
            self._warn(note)
        return path, precision

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)
