"""The optimizer step of a training step that a non-finite loss or gradient must skip, without a host sync
where torch allows it.

Fused SGD can be told to skip by an on-device flag: the `found_inf` attribute its step reads, the private
protocol torch's GradScaler uses. Two things go with it: an optimizer built fused whose state came from a run
that was not (`load_state_dict` restores the groups' ``fused: False``) is made fused again (both keep the same
state, and torch would otherwise hand the flag to the unfused step, which refuses it); and every momentum
buffer is filled with zeros before the first step, since a skipped first fused step leaves torch 2.14's
buffers uninitialised (a zero buffer is exact: with dampening 0, ``0 * momentum + grad`` is the first step's
``grad``). That protocol is private, so it is used only on the torch releases it was tested on
(`utils.core.tested_versions.TORCH_TESTED`); any other optimizer or torch takes the plain step: one sync to
read the flag, then step or not.
"""
import logging

import torch

from utils.core import tested_versions

logger = logging.getLogger(__name__)


class OptimizerStep:
    """`step(taken)`: the optimizer's step when the bool tensor `taken` is true, else nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.on_device = getattr(optimizer, '_step_supports_amp_scaling', False) and self._torch_tested()
        if self.on_device:
            for group in optimizer.param_groups:
                if 'fused' in group:
                    group['fused'] = True
            self._zero_missing_momentum()  # once: later steps update the buffers in place

    @staticmethod
    def _torch_tested() -> bool:
        if tested_versions.within(torch.__version__, tested_versions.TORCH_TESTED):
            return True
        logger.warning('torch %s is outside the releases the on-device skipped step was tested on (%s): '
                       'each training step waits for the GPU once to decide whether to step', torch.__version__,
                       tested_versions.range_text(tested_versions.TORCH_TESTED))
        return False

    def _zero_missing_momentum(self) -> None:
        for group in self.optimizer.param_groups:
            if not group.get('momentum') or group.get('dampening'):
                continue
            for param in group['params']:
                state = self.optimizer.state[param]
                if state.get('momentum_buffer') is None:
                    state['momentum_buffer'] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def __call__(self, taken: torch.Tensor) -> None:
        if self.on_device:
            self.optimizer.found_inf = (~taken).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif bool(taken):  # a plain optimizer cannot be told to skip: the one sync of this step
            self.optimizer.step()
