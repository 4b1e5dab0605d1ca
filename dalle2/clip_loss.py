"""CLIP's contrastive loss across workers, and retrieval metrics.

The loss takes ``rank`` and ``world_size`` as arguments, so ``world_size=1`` needs no
process group and tests run it directly (the habit of open_clip's ``ClipLoss``).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_features(features: torch.Tensor, world_size: int) -> torch.Tensor:
    """All workers' features [world_size * N, D], with gradients flowing back to each worker's own."""
    if world_size == 1:
        return features
    if not dist.is_initialized():
        raise RuntimeError(f"world_size={world_size} needs an initialised torch.distributed process group")
    # The autograd-aware all_gather: its backward sends each worker its features' gradient.
    import torch.distributed.nn.functional as dist_nn

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public one
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_nn.all_gather(features), dim=0)


class ContrastiveLoss:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3) over the global batch.

    Each worker scores its own N images against all gathered texts (and vice versa):
    the same gradients as one global logits matrix at 1/world_size of the memory.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        # image_features, text_features: [N, D], L2-normalised; logit_scale: exp of the learned temperature
        all_images = gather_features(image_features, self.world_size)  # [W*N, D]
        all_texts = gather_features(text_features, self.world_size)
        logits_per_image = logit_scale * image_features @ all_texts.T  # [N, W*N]
        logits_per_text = logit_scale * text_features @ all_images.T
        n = image_features.shape[0]
        labels = torch.arange(n, device=image_features.device) + n * self.rank
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k retrieval accuracy of matching pairs (row i of each is a pair).

    Returns ``text_to_image_top{k}`` (for each caption, is its image among the k nearest)
    and ``image_to_text_top{k}``.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"paired features must match: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    similarity = text_features @ image_features.T  # [N texts, N images]
    truth = torch.arange(similarity.shape[0], device=similarity.device)
    metrics = {}
    for direction, scores in (("text_to_image", similarity), ("image_to_text", similarity.T)):
        # rank of the true match = how many candidates score strictly higher
        true_score = scores[truth, truth].unsqueeze(1)
        rank = (scores > true_score).sum(dim=1)
        for k in ks:
            metrics[f"{direction}_top{k}"] = (rank < k).float().mean().item()
    return metrics
