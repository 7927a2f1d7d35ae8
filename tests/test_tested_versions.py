"""The torch / torchvision releases the private pieces were tested on (utils/core/tested_versions.py), and the
optimizer step behind them: the on-device skip of fused SGD and the plain step it falls back to."""
import logging
import os

import pytest
import torch

from utils.core import tested_versions
from utils.training.optimizer_step import OptimizerStep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pins():
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        lines = [line.split('#', 1)[0].strip() for line in f]
    return dict(line.split('==') for line in lines if line)


def test_the_pinned_torch_and_torchvision_lie_in_the_tested_releases():
    """Moving a pin past a range means testing the private pieces on the new release first, then the range."""
    assert tested_versions.within(pins()['torchvision'], tested_versions.TORCHVISION_TESTED)
    assert tested_versions.within(pins()['torch'], tested_versions.TORCH_TESTED)
    assert tested_versions.release('2.14.1+cu130') == (2, 14)
    assert not tested_versions.within('0.30.0', ((0, 29), (0, 30)))
    assert tested_versions.range_text(((0, 29), (0, 30))) == '>=0.29, <0.30'


def steps(optimizer_step, parameter, flags):
    """One step per flag (the same gradient each time); the weights and momentum after each."""
    trace = []
    for taken in flags:
        parameter.grad = torch.full_like(parameter, 0.5)
        optimizer_step(torch.tensor(taken))
        momentum = optimizer_step.optimizer.state[parameter].get('momentum_buffer')
        trace.append((parameter.detach().clone(), None if momentum is None else momentum.clone()))
    return trace


def fused_sgd():
    parameter = torch.nn.Parameter(torch.ones(3))
    return parameter, torch.optim.SGD([parameter], lr=0.1, momentum=0.9, fused=True)


def test_fused_sgd_skips_on_the_device_and_the_plain_step_outside_the_tested_torch_does_the_same(
        monkeypatch, caplog):
    flags = [False, True, False, True]  # a skipped first step, then alternating
    parameter, optimizer = fused_sgd()
    on_device = OptimizerStep(optimizer)
    assert on_device.on_device
    expected = steps(on_device, parameter, flags)

    monkeypatch.setattr(tested_versions, 'TORCH_TESTED', ((1, 0), (1, 1)))
    parameter, optimizer = fused_sgd()
    with caplog.at_level(logging.WARNING):
        plain = OptimizerStep(optimizer)
    assert not plain.on_device and 'outside the releases the on-device skipped step was tested on' in caplog.text
    got = steps(plain, parameter, flags)
    assert torch.equal(expected[0][0], torch.ones(3))  # the skipped first step moved nothing
    for (weights, momentum), (plain_weights, plain_momentum) in zip(expected[1:], got[1:]):
        assert torch.allclose(weights, plain_weights) and torch.allclose(momentum, plain_momentum)
    assert not torch.equal(got[-1][0], torch.ones(3))


def test_an_optimizer_without_the_on_device_protocol_takes_the_plain_step():
    parameter = torch.nn.Parameter(torch.ones(2))
    step = OptimizerStep(torch.optim.SGD([parameter], lr=0.1))
    assert not step.on_device
    (skipped, _), (taken, _) = steps(step, parameter, [False, True])
    assert torch.equal(skipped, torch.ones(2)) and torch.allclose(taken, torch.full((2,), 0.95))


def test_a_fused_optimizer_restored_from_an_unfused_run_is_fused_again():
    parameter, optimizer = fused_sgd()
    state = optimizer.state_dict()
    state['param_groups'][0]['fused'] = False
    optimizer.load_state_dict(state)
    step = OptimizerStep(optimizer)
    assert step.on_device and optimizer.param_groups[0]['fused'] is True
    assert not optimizer.state[parameter]['momentum_buffer'].any()  # zero buffers before the first step
    steps(step, parameter, [False])
    assert torch.equal(parameter.detach(), torch.ones(3))


@pytest.mark.parametrize('flag', [True, False])
def test_the_skip_flag_is_gone_after_each_step(flag):
    parameter, optimizer = fused_sgd()
    steps(OptimizerStep(optimizer), parameter, [flag])
    assert not hasattr(optimizer, 'found_inf')
