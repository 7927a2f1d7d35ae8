"""Image vectors from a Faster R-CNN's own FPN features (what `embed` uploads to a feature set).

Why this recipe:
- Every variant's FPN outputs 256 channels per level, and one RPN head and one
  box head read every level with the same weights, so a channel means the same
  thing at every scale: levels can be averaged channel-wise without a learned
  projection (which this network does not have; a random one would only add noise).
- Each level is average-pooled over the image's own area, not the batch's padding,
  so a larger batch neighbour does not dilute an item's vector (only cells at the
  image's border still see the padding through their receptive field: a small effect).
- Levels get equal weight: small objects live on the fine levels, large ones on
  the coarse, and the vector should see both.
- L2-normalised, so the platform's similarity (cosine) is a dot product.
"""
import math
from typing import List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F

EMBEDDING_SIZE = 256  # torchvision's FPN width, the same in all four variants


def fpn_embedding(features: Mapping[str, torch.Tensor], image_sizes: Sequence[Tuple[int, int]],
                  padded_size: Tuple[int, int]) -> torch.Tensor:
    """[N, 256] float32 unit vectors: per level, the mean over each image's valid region; then the levels' mean.

    `features` is the backbone's output (level name -> [N, 256, h, w]) for a batch
    padded to `padded_size` (H, W); `image_sizes` are each image's (h, w) inside it.
    """
    padded_h, padded_w = padded_size
    levels: List[torch.Tensor] = []
    for level in features.values():
        level = level.float()
        if level.shape[1] != EMBEDDING_SIZE:
            raise ValueError(f'expected {EMBEDDING_SIZE} FPN channels, got {level.shape[1]}')
        rows, cols = level.shape[-2:]
        pooled = []
        for index, (height, width) in enumerate(image_sizes):
            # the cells whose stride window starts inside the image (not in the batch's padding)
            valid_rows = max(1, min(rows, math.ceil(height * rows / padded_h)))
            valid_cols = max(1, min(cols, math.ceil(width * cols / padded_w)))
            pooled.append(level[index, :, :valid_rows, :valid_cols].mean(dim=(1, 2)))
        levels.append(torch.stack(pooled))
    return F.normalize(torch.stack(levels).mean(dim=0), dim=1)
