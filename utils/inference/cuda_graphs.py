"""CUDA graphs for the parts of the inference network whose shapes a padded batch fixes.

Why: on a fast GPU the fp16 forward pass waits on the host launching its kernels, and the same
host decodes images and builds annotations (bench/RESULTS.md: end to end stopped near parity with
plain torchvision's forward). A CUDA graph launches a captured sequence of kernels in one call.
With padding buckets (`model_factory.BucketedTransform`) the padded batch shapes repeat, so four
calls are captured per (padded shape, batch size): the backbone with its FPN, the RPN head, and
the box head and box predictor on a fixed number of rows (the proposals padded up to a multiple of
the RPN's post-NMS count per image). What depends on the data (anchors, proposal selection, NMS,
detections) stays eager, on the batched post-processing (`utils.modeling.batched_postprocess`).

Rules that keep a replay correct:
- a replay reads only its static input buffers, so every call copies its inputs into them first
  (the box head and predictor work row by row in eval mode, so the rows padded past a call's
  proposals hold whatever came before and never reach the real rows, which are cut back out);
  the copy is skipped only when the input *is* that buffer (the backbone's static output handed to
  the RPN head, whose graph was captured on it);
- outputs are the graph's static buffers, valid until that graph replays again: one forward pass at
  a time per network (the deployed service runs one execution at a time);
- a shape is captured the second time it is seen (a one-off shape runs eagerly and holds no memory),
  at most `MAX_GRAPHS` are kept (least recently used dropped), and a failed capture leaves that shape
  eager for good;
- weights are cast to fp16 inside the graph (autocast's cast cache off while capturing): a cast cached
  before the capture would be read from freed memory at every replay.
Off unless the `cuda_graphs` setting is on (README: what a run on a GPU must show before it is the default).
"""
import collections
import contextlib
import logging
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

logger = logging.getLogger(__name__)

#: graphs kept per network, all modules together (4 per padded shape and batch size). Each holds its
#: static buffers (for resnet50_fpn's backbone at batch 16 and 800x1216 px, about 0.2 GB of input and
#: 0.7 GB of fp16 FPN features: 3 shapes about 2.7 GB) besides the intermediates' pool they share; the
#: peak on a 16 GB T4 is still to be measured (bench/graph_speed.py prints it).
MAX_GRAPHS = 12
#: a shape is captured the time it is seen this often (the first time runs eagerly)
CAPTURE_AFTER = 2
#: eager runs on a side stream before a capture (cuDNN picks its kernels, lazy state is created)
WARMUP_RUNS = 2


class CudaGraphApi:
    """torch.cuda's graph API: warm-up on a side stream, capture into one memory pool shared by a network's graphs.

    Sharing the pool is safe here: replays run one after another on one stream, and every graph's
    outputs stay referenced while it lives, so no capture is handed another graph's live outputs.
    """

    def __init__(self):
        self._pool = None

    @staticmethod
    def supports(tensors: Sequence[Tensor]) -> bool:
        return all(tensor.is_cuda for tensor in tensors)

    def capture(self, fn: Callable[..., Any], inputs: List[Tensor]) -> Tuple[Any, Any]:
        """(graph, outputs): `fn(*inputs)` recorded; `graph.replay()` reruns it on the same buffers."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the decoding and uploading threads beside this one may use CUDA meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode='thread_local'), _no_cast_cache('cuda'):
            outputs = fn(*inputs)
        return graph, outputs


@contextlib.contextmanager
def _no_cast_cache(device_type: str):
    """Autocast as it is, minus its cache of weights cast to fp16 (see the module docstring)."""
    with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                        enabled=torch.is_autocast_enabled(device_type), cache_enabled=False):
        yield


class _Captured:
    """One captured call: its graph, static inputs and outputs; `rows`: the padded first dimension, or None."""

    def __init__(self, graph, inputs: List[Tensor], outputs: Any, rows: Optional[int]):
        self.graph, self.inputs, self.rows = graph, inputs, rows
        self.output_leaves, self._output_spec = tree_flatten(outputs)

    def replay(self, leaves: List[Tensor]) -> Any:
        for static, leaf in zip(self.inputs, leaves):
            if not _same_buffer(static, leaf):
                (static if self.rows is None else static[:leaf.shape[0]]).copy_(leaf)
        self.graph.replay()
        outputs = self.output_leaves
        if self.rows is not None:
            outputs = [output[:leaves[0].shape[0]] for output in outputs]
        return tree_unflatten(outputs, self._output_spec)


def _same_buffer(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class GraphSet:
    """A network's captured calls: a bounded least-recently-used table, the shapes seen, the shapes that failed."""

    def __init__(self, api=None, max_graphs: int = MAX_GRAPHS, capture_after: int = CAPTURE_AFTER):
        self.api = api if api is not None else CudaGraphApi()
        self.max_graphs, self.capture_after = max_graphs, capture_after
        self.enabled = False
        self.captures = self.replays = 0
        self._graphs: 'collections.OrderedDict[Hashable, _Captured]' = collections.OrderedDict()
        self._seen: Dict[Hashable, int] = collections.Counter()
        self._failed = set()
        self._outputs: Dict[int, Tensor] = {}  # data_ptr -> a live graph's static output (adopted as an input)

    def __len__(self) -> int:
        return len(self._graphs)

    def call(self, name: str, fn: Callable[..., Any], args: tuple,
             rows_bucket: Optional[Callable[[], int]] = None) -> Any:
        """`fn(*args)`, replayed from a graph when one is captured for these input shapes, else eagerly."""
        leaves, spec = tree_flatten(args)
        if not (self.enabled and leaves and all(isinstance(leaf, Tensor) for leaf in leaves)
                and self.api.supports(leaves)):
            return fn(*args)
        rows = None
        if rows_bucket is not None:
            if len({leaf.shape[0] for leaf in leaves}) != 1 or leaves[0].shape[0] == 0:
                return fn(*args)
            rows = _round_up(leaves[0].shape[0], max(1, int(rows_bucket())))
        key = _key(name, leaves, rows)
        entry = self._graphs.get(key) or self._capture(key, fn, leaves, spec, rows)
        if entry is None:
            return fn(*args)
        self._graphs.move_to_end(key)
        self.replays += 1
        return entry.replay(leaves)

    def _capture(self, key: Hashable, fn, leaves: List[Tensor], spec, rows: Optional[int]) -> Optional[_Captured]:
        if key in self._failed:
            return None
        self._seen[key] += 1
        if self._seen[key] < self.capture_after:
            return None
        try:
            inputs = [self._static_input(leaf, rows) for leaf in leaves]
            graph, outputs = self.api.capture(lambda *flat: fn(*tree_unflatten(list(flat), spec)), inputs)
        except Exception as err:  # any failure: this shape stays eager, prediction goes on
            self._failed.add(key)
            logger.warning('CUDA graph capture of the %s for inputs %s failed (%s: %s): that shape runs eagerly',
                           key[0], [tuple(leaf.shape) for leaf in leaves], type(err).__name__, err)
            return None
        entry = self._graphs[key] = _Captured(graph, inputs, outputs, rows)
        self._outputs.update((output.data_ptr(), output) for output in entry.output_leaves)
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            _, dropped = self._graphs.popitem(last=False)
            for output in dropped.output_leaves:
                self._outputs.pop(output.data_ptr(), None)
        logger.debug('captured the %s for inputs %s (%d graphs kept)', key[0], [tuple(leaf.shape) for leaf in leaves],
                     len(self._graphs))
        return entry

    def _static_input(self, leaf: Tensor, rows: Optional[int]) -> Tensor:
        """The buffer a graph reads this input from: a live graph's output it already is, else a new one."""
        if rows is None:
            adopted = self._outputs.get(leaf.data_ptr())
            if adopted is not None and _same_buffer(adopted, leaf):
                return adopted
            return leaf.clone()  # same strides (channels_last stays channels_last)
        padded = leaf.new_zeros((rows,) + tuple(leaf.shape[1:]))
        padded[:leaf.shape[0]].copy_(leaf)
        return padded


def _key(name: str, leaves: List[Tensor], rows: Optional[int]) -> Hashable:
    """What a graph is valid for: the module, each input's shape (rows padded), layout, dtype and device,
    and autocast's state (the graph holds the kernels of one precision)."""
    device_type = leaves[0].device.type
    precision = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    shapes = tuple(((rows,) + tuple(leaf.shape[1:]) if rows is not None else tuple(leaf.shape), leaf.stride()[1:],
                    leaf.dtype, leaf.device) for leaf in leaves)
    return name, rows, shapes, precision


class GraphedModule(nn.Module):
    """`module` run through a network's `GraphSet`: replayed when captured for its inputs, else eagerly."""

    def __init__(self, module: nn.Module, graphs: GraphSet, name: str,
                 rows_bucket: Optional[Callable[[], int]] = None):
        super().__init__()
        self.module, self.name, self.rows_bucket = module, name, rows_bucket
        self.graphs = graphs

    def forward(self, *args):
        return self.graphs.call(self.name, self.module, args, self.rows_bucket)


def use_graphs(network: nn.Module, on: bool, api=None) -> Optional[GraphSet]:
    """Turn replay on or off for an inference network (its wrappers are installed the first time it is
    turned on); returns its GraphSet, or None when it has none. Without `api`, only a network on CUDA gets
    one: on the CPU the network predicted with is the trained model itself, whose modules must not change."""
    installed = network.backbone.graphs if isinstance(network.backbone, GraphedModule) else None
    if installed is None and on and (api is not None or next(network.parameters()).is_cuda):
        installed = _install(network, GraphSet(api))
    if installed is not None:
        installed.enabled = bool(on)
    return installed


def _install(network: nn.Module, graphs: GraphSet) -> GraphSet:
    rows = network.rpn.post_nms_top_n  # proposals an image at most: the box head's rows are padded to a multiple
    network.backbone = GraphedModule(network.backbone, graphs, 'backbone')
    network.rpn.head = GraphedModule(network.rpn.head, graphs, 'RPN head')
    network.roi_heads.box_head = GraphedModule(network.roi_heads.box_head, graphs, 'box head', rows)
    network.roi_heads.box_predictor = GraphedModule(network.roi_heads.box_predictor, graphs, 'box predictor', rows)
    return graphs
