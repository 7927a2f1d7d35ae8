"""A test double for the CUDA graph API (`utils.inference.cuda_graphs.CudaGraphApi`), for machines without CUDA.

It keeps what makes graphs dangerous: a replay recomputes from the static input buffers captured with
the graph, never from the caller's tensors, and writes into the same output buffers every time. Code
that forgets to copy new inputs in, or hands out outputs that the next replay overwrites, fails the
same way here as on a GPU. `captured` counts the captures, `replayed` the replays.
"""
from torch.utils._pytree import tree_flatten


class _HostGraph:
    def __init__(self, api, fn, inputs, outputs):
        self._api, self._fn, self._inputs = api, fn, inputs
        self._outputs = tree_flatten(outputs)[0]

    def replay(self):
        self._api.replayed += 1
        for static, fresh in zip(self._outputs, tree_flatten(self._fn(*self._inputs))[0]):
            static.copy_(fresh)


class HostGraphApi:
    def __init__(self, fail=False):
        self.fail, self.captured, self.replayed = fail, 0, 0

    @staticmethod
    def supports(tensors):
        return True

    def capture(self, fn, inputs):
        if self.fail:
            raise RuntimeError('operation not permitted when stream is capturing (simulated)')
        self.captured += 1
        outputs = fn(*inputs)
        return _HostGraph(self, fn, inputs, outputs), outputs
