"""The detector's per-image output dicts as rows on the host: shared by evaluation (training) and prediction."""
from typing import Dict, List

import torch


def detections_to_host(outputs: List[Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
    """Per image, the detector's output as float rows [left, top, right, bottom, score, label id] on the
    CPU, the whole batch in one copy: one host sync, not three per image."""
    if not outputs:
        return []
    rows = [torch.cat([o['boxes'].float(), o['scores'].float()[:, None], o['labels'].float()[:, None]], dim=1)
            for o in outputs]
    return list(torch.cat(rows).cpu().split([len(r) for r in rows]))
