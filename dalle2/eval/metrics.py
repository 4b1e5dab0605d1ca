"""The numbers of ``dalle2 eval``: plain functions of embeddings and features.

    retrieval          CLIP: does each caption find its own image among the held-out ones?
    prior_cosine       prior: predicted vs true CLIP image embedding, beside two baselines
    clip_score         generated image vs its caption, in CLIP space
    frechet_distance   generated vs real image features (FID's formula on our CLIP's features)
    seed_spread        two seeds' images of one caption: how far apart, beside the data's own spread

Embeddings are torch tensors [N, D] as the models return them (not normalised); every
cosine is taken here.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dalle2.clip_loss import retrieval_metrics


def retrieval(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, labels: Optional[Sequence[tuple]] = None
) -> dict[str, float]:
    """Top-1/top-5 retrieval of matching rows both ways, and chance (1/N) to read them against.

    With ``labels`` (one tuple per row, e.g. the shapes dataset's attributes), also the share
    of captions whose nearest image has the caption's labels: rows that share every label are
    interchangeable images, and exact-row retrieval would count picking the twin as a miss."""
    metrics = retrieval_metrics(image_embeds, text_embeds, ks=(1, 5))
    metrics["chance_top1"] = 1.0 / image_embeds.shape[0]
    if labels is not None:
        similarity = F.normalize(text_embeds.float(), dim=-1) @ F.normalize(image_embeds.float(), dim=-1).T
        nearest = similarity.argmax(dim=1).tolist()
        metrics["text_to_image_top1_same_labels"] = float(np.mean([labels[j] == labels[i] for i, j in enumerate(nearest)]))
    return metrics


def zero_shot_accuracy(image_embeds: torch.Tensor, choice_embeds: torch.Tensor, truth: Sequence[int]) -> float:
    """CLIP's zero-shot classification: the share of images [N, D] whose most similar of their
    own candidate captions [N, V, D] (cosine) is the true one, ``truth[n]`` of V."""
    images, choices = F.normalize(image_embeds.float(), dim=-1), F.normalize(choice_embeds.float(), dim=-1)
    best = torch.einsum("nd,nvd->nv", images, choices).argmax(1)
    return float((best == torch.as_tensor(list(truth))).float().mean())


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of cos(a_i, b_i); ``b`` may be one row [D] shared by all."""
    b = b.expand_as(a) if b.dim() == 1 else b
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def prior_cosine(
    predicted: torch.Tensor, true: torch.Tensor, text_embeds: torch.Tensor, mean_image_embed: torch.Tensor
) -> dict[str, float]:
    """Cosine of the prior's image embeddings with the true ones [N, D], and of the two
    answers that need no prior (DALL-E 2 section 5.1 compares against the first):

    - ``baseline_text_embedding``: the caption's CLIP text embedding itself, as if text and
      image embeddings were interchangeable;
    - ``baseline_mean_image_embedding``: the mean training image embedding (the prior's own
      normalisation statistics), the best constant answer.

    A prior that learned something beats both."""
    metrics = {
        "cosine": mean_cosine(predicted, true),
        "baseline_text_embedding": mean_cosine(text_embeds, true),
        "baseline_mean_image_embedding": mean_cosine(true, mean_image_embed.to(true)),
    }
    metrics["beats_baselines"] = metrics["cosine"] > max(metrics["baseline_text_embedding"], metrics["baseline_mean_image_embedding"])
    return metrics


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Mean cosine of each image's CLIP embedding with its caption's (Hessel et al. 2021
    without their 2.5 x max(., 0) rescaling, so it reads as a plain cosine)."""
    return mean_cosine(image_embeds, text_embeds)


def clip_score_std(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Standard deviation over images of that cosine: the standard error of the CLIP score of N
    images is this / sqrt(N) (what tells two settings' scores apart, dalle2.eval.sweep)."""
    return F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1).std().item()


def _trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr sqrt(A B) for symmetric PSD A, B, through symmetric eigendecompositions only:
    A B is similar to A^1/2 B A^1/2 (symmetric PSD), so they share their eigenvalues. No
    general matrix square root (scipy's sqrtm) and no complex round-off to discard."""
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root_a @ sigma_b @ root_a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two sets of features [N, D] (Heusel et
    al. 2017, the formula of FID): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2).

    With fewer samples than dimensions the covariances are singular; the formula still
    holds, but the value is biased upward at small N: compare values at the same N."""
    a, b = (np.asarray(torch.as_tensor(f).double().cpu()) for f in (features_a, features_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two feature sets [N, D] of the same D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least 2 samples per set to estimate a covariance")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * _trace_sqrt_product(cov_a, cov_b)
    return max(float(distance), 0.0)  # round-off can leave -1e-12 for identical sets


def clip_features(embeds: torch.Tensor) -> torch.Tensor:
    """The features the Frechet distance uses: L2-normalised CLIP image embeddings, so the
    distance measures where images lie in CLIP space, not how long CLIP's vectors are."""
    return F.normalize(embeds.float(), dim=-1)


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().mean() / 2).item()  # images in [-1, 1]: a difference in [0, 1]


def seed_spread(first: torch.Tensor, second: torch.Tensor, data_pairs: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, Any]:
    """How much two seeds' images [N, 3, S, S] of the same N captions differ: the mean absolute
    pixel difference (0 = copies, 1 = black against white), beside two yardsticks:

    - ``different_captions``: each first image against the next row's, the spread across prompts;
    - ``data`` (given ``data_pairs``, two images the dataset could hold for each caption): the
      spread the training data itself has within one caption, so ``ratio`` = seeds / data reads
      as "seeds differ as much as the data does" at 1, near copies near 0."""
    if first.shape != second.shape or len(first) < 2:
        raise ValueError(f"need two image sets of one shape [N >= 2, ...], got {tuple(first.shape)} and {tuple(second.shape)}")
    spread: dict[str, Any] = {
        "pairs": len(first),
        "seeds": _mean_abs(first, second),
        "different_captions": _mean_abs(first, first.roll(1, dims=0)),
        "data": None,
        "ratio": None,
    }
    if data_pairs is not None:
        spread["data"] = _mean_abs(*data_pairs)
        spread["ratio"] = spread["seeds"] / spread["data"] if spread["data"] > 0 else None
    return spread
