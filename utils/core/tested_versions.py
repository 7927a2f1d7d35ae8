"""The torch and torchvision releases whose private parts this project relies on, in one place.

Two pieces reach past the public API. The batched post-processing heads
(`utils.modeling.batched_postprocess`) subclass torchvision's RegionProposalNetwork and RoIHeads: their
constructors' arguments, `filter_proposals` / `postprocess_detections` and the attributes those read. The
no-sync training step (`utils.training.optimizer_step`) hands fused SGD an on-device skip flag (`found_inf`,
the protocol torch's GradScaler uses) and fills the momentum buffers a skipped first fused step leaves
uninitialised (torch 2.14). Each was tested on the releases below (requirements.txt pins one of each;
tests/test_tested_versions.py keeps the pins inside); outside them each falls back to the public behaviour,
torchvision's own heads and a plain optimizer step (one host sync a step), with a warning.
"""
import re
from typing import Tuple

#: [first, end) of the torchvision releases the batched heads were tested on.
TORCHVISION_TESTED = ((0, 29), (0, 30))
#: [first, end) of the torch releases the on-device skipped step was tested on.
TORCH_TESTED = ((2, 14), (2, 15))


def release(version: str) -> Tuple[int, int]:
    """'2.14.1+cu130' -> (2, 14)."""
    match = re.match(r'(\d+)\.(\d+)', version)
    if not match:
        raise ValueError(f'not a version: {version!r}')
    return int(match.group(1)), int(match.group(2))


def within(version: str, tested: Tuple[Tuple[int, int], Tuple[int, int]]) -> bool:
    """Whether `version`'s release lies in the `tested` range."""
    first, end = tested
    return first <= release(version) < end


def range_text(tested: Tuple[Tuple[int, int], Tuple[int, int]]) -> str:
    """'>=0.29, <0.30' for a warning."""
    (a, b), (c, d) = tested
    return f'>={a}.{b}, <{c}.{d}'
