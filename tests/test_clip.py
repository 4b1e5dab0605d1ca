"""CLIP through open_clip: encoders, the distributed contrastive loss, retrieval, and that it learns."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from dalle2.clip import Clip, open_clip_dims, tokenize
from dalle2.clip_loss import ContrastiveLoss, retrieval_metrics
from dalle2.config import ClipConfig
from dalle2.factory import create_model, load_config


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create_model("clip", "tiny").eval()


def test_tokenizer_works_offline_and_truncates_keeping_end_of_text():
    tokens = tokenize(["a red circle", "word " * 100], context_length=16)
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    eot = tokens[0].max()  # the end-of-text id is the largest in the vocabulary
    assert tokens[1, -1] == eot and (tokens[1] != 0).all()  # truncated, ends with end-of-text
    assert (tokens[0, 5:] == 0).all()  # short captions are 0-padded


def test_text_encoder_returns_pooled_embedding_and_token_states(clip):
    tokens = clip.tokenize(["a red circle", "a small blue square at the top left"])
    encoding = clip.encode_text(tokens)
    config = clip.config
    assert encoding.embed.shape == (2, config.embed_dim)
    assert encoding.hidden.shape == (2, config.context_length, config.text_width)
    assert encoding.mask.sum(1).tolist() == [(t != 0).sum().item() for t in tokens]
    # The pooled embedding is the projected state at the end-of-text token.
    eot = tokens.argmax(dim=1)
    pooled = encoding.hidden[torch.arange(2), eot] @ clip.model.text_projection
    torch.testing.assert_close(pooled, encoding.embed)


def test_image_encoder_takes_any_size_in_minus_one_one(clip):
    for size in (32, 64):
        assert clip.encode_image(torch.rand(2, 3, size, size) * 2 - 1).shape == (2, clip.config.embed_dim)


def test_stock_open_clip_names_build_from_config():
    dims = open_clip_dims("ViT-B-32")
    assert (dims["embed_dim"], dims["text_width"], dims["image_size"]) == (512, 512, 224)
    model = Clip(ClipConfig("ViT-B-32"), device="meta")
    assert model.config.embed_dim == 512


def test_unknown_clip_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        open_clip_dims("ViT-Q-99")


def test_retrieval_metrics_golden():
    images = torch.eye(4)
    texts = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0.1]])
    metrics = retrieval_metrics(images, texts, ks=(1, 2))
    # texts 0, 1 find their images first; texts 2 and 3 point at each other's image.
    assert metrics["text_to_image_top1"] == 0.5
    assert metrics["text_to_image_top2"] == 1.0
    assert metrics["image_to_text_top1"] == 0.5


def _global_loss(images, texts, scale):
    logits = scale * images @ texts.T
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_contrastive_loss_single_worker_is_clip_loss():
    images, texts = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(10.0)
    torch.testing.assert_close(ContrastiveLoss()(images, texts, scale), _global_loss(images, texts, scale))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, images, texts, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        n = len(images) // world_size
        local_images = images[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        local_texts = texts[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        loss = ContrastiveLoss(rank, world_size)(local_images, local_texts, torch.tensor(10.0))
        # all_gather's backward sums every worker's gradient into each worker's own features;
        # data-parallel training then averages over workers (DDP / DeepSpeed divide by world size).
        loss.backward()
        results[rank] = (loss.item(), local_images.grad / world_size)
    finally:
        torch.distributed.destroy_process_group()


def test_contrastive_loss_gathers_across_workers_with_gradients():
    """Two gloo workers, each with half the batch, give the global loss and its gradients."""
    images = F.normalize(torch.randn(8, 16), dim=-1)
    texts = F.normalize(torch.randn(8, 16), dim=-1)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), images, texts, results), nprocs=2, join=True)

    reference_images = images.clone().requires_grad_(True)
    reference = _global_loss(reference_images, texts, torch.tensor(10.0))
    reference.backward()
    mean_loss = sum(results[rank][0] for rank in range(2)) / 2
    assert mean_loss == pytest.approx(reference.item(), rel=1e-5)
    for rank in range(2):
        torch.testing.assert_close(results[rank][1], reference_images.grad[rank * 4 : (rank + 1) * 4])


COLORS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "yellow": (1.0, 1.0, -1.0),
          "white": (1.0, 1.0, 1.0), "purple": (0.5, -1.0, 1.0)}
SHAPES = ("square", "circle", "stripe")


def _pairs(n, generator, size=32):
    """Images of a colored shape on a grey background, captioned with color and shape."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, captions = torch.full((n, 3, size, size), -0.2), []
    for i in range(n):
        color = list(COLORS)[torch.randint(len(COLORS), (1,), generator=generator)]
        shape = SHAPES[torch.randint(len(SHAPES), (1,), generator=generator)]
        cy, cx = torch.randint(8, size - 8, (2,), generator=generator).tolist()
        r = torch.randint(4, 8, (1,), generator=generator).item()
        if shape == "square":
            mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        elif shape == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = (yy - cy).abs() <= 2
        images[i][:, mask] = torch.tensor(COLORS[color])[:, None]
        captions.append(f"a {color} {shape}")
    return images, captions


@pytest.mark.slow
def test_tiny_clip_learns_retrieval_far_above_chance():
    torch.manual_seed(0)
    clip = create_model("clip", load_config("clip", "tiny"))
    loss_fn = ContrastiveLoss()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        images, captions = _pairs(64, g)
        image_features, text_features = clip(images, clip.tokenize(captions))
        loss = loss_fn(image_features, text_features, clip.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # Held out: one fresh image for each of the 18 distinct captions.
    clip.eval()
    captions = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    images = torch.cat([_pairs(1, torch.Generator().manual_seed(100 + i))[0] for i in range(len(captions))])
    for i, caption in enumerate(captions):  # redraw until each image matches its caption
        seed = 1000 + i
        while True:
            image, (drawn,) = _pairs(1, torch.Generator().manual_seed(seed))
            if drawn == caption:
                images[i] = image[0]
                break
            seed += 37
    with torch.no_grad():
        image_features, text_features = clip(images, clip.tokenize(captions))
    metrics = retrieval_metrics(image_features, text_features)
    chance = 1 / len(captions)
    top1 = (metrics["text_to_image_top1"] + metrics["image_to_text_top1"]) / 2
    assert top1 >= 3 * chance, metrics  # measured ~0.39 (7x chance) after 100 steps
    assert metrics["text_to_image_top5"] >= 0.6, metrics  # chance: 5/18 = 0.28


def test_caption_mask_keeps_exclamation_marks_which_share_the_padding_id(clip):
    """open_clip's BPE id 0 is "!" as well as padding: the mask ends at the end-of-text token."""
    from dalle2.clip import _tokenizer
    from dalle2.text_encoder import caption_mask

    assert _tokenizer().decoder[0] == "!"  # a real token: "!" inside a word with no merge for it
    start, end = _tokenizer().encoder["<start_of_text>"], _tokenizer().encoder["<end_of_text>"]
    tokens = torch.zeros(2, clip.config.context_length, dtype=torch.long)
    tokens[0, :5] = torch.tensor([start, 320, 0, 2368, end])  # "a ! cat" with the "!" as id 0
    tokens[1, :4] = torch.tensor([start, 320, 2368, end])
    mask = caption_mask(tokens)
    ends = tokens.argmax(dim=1)
    for row in range(2):
        assert mask[row, : ends[row] + 1].all() and not mask[row, ends[row] + 1 :].any()
    assert clip.encode_text(tokens).mask.equal(mask)
    # The decoder's own caption encoder reads the "!" too: changing it changes the output.
    decoder = create_model("decoder", "tiny").eval()
    other = tokens.clone()
    other[0, 2] = 3  # replace the "!" (id 0) by another token
    with torch.no_grad():
        assert not torch.allclose(decoder.text_encoder(tokens).pooled[0], decoder.text_encoder(other).pooled[0])
