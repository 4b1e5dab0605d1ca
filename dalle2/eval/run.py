"""``dalle2 eval``: score a cascade of bundles on held-out rows of a dataset.

    report = run_eval(EvalSettings(bundles="runs/demo/bundles", data="runs/demo/data", out="runs/demo/eval"))

Every stage found in the bundle folder is scored, each on what it alone decides:

    clip     retrieval of held-out images by their captions and back
    prior    cosine of its image embeddings with the true ones, beside two baselines
    decoder  images generated from the held-out captions (through the prior when there is
             one, else from the true images' CLIP embeddings), then the upsamplers:
             CLIP score, Frechet distance to the real images in CLIP feature space, and,
             for the shapes dataset, the pixel checker's accuracy per attribute

The held-out rows are the training pipeline's validation split (the same stable hash of
the key, :func:`dalle2.data.preprocess.in_validation`), decoded and tokenized by the same
:func:`~dalle2.data.preprocess.preprocess_batch`, so no evaluated row was trained on as
long as ``validation_fraction`` is the training jobs' (0.05 in every tiny config).

Writes ``report.json`` (every number, the settings, wall times), ``samples.png``
(generated rows above their real images) and ``clip_similarity.png`` into ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from dalle2.bundle import Bundle
from dalle2.cascade import UnCLIP, decode, load_bundles, sample_image_embeds, upsample
from dalle2.clip import Clip, TextEncoding, tokenize
from dalle2.data import storage
from dalle2.data.preprocess import decode_image, preprocess_batch, to_model_images
from dalle2.data.schema import TRAINING_COLUMNS, check_columns, dataset_files, read_schema
from dalle2.data.shapes import LABEL_COLUMNS, LABEL_VALUES, PHRASINGS, caption, draw_twice, held_out_caption
from dalle2.eval import metrics
from dalle2.eval.shapes_checker import read_attributes
from dalle2.eval.stage_options import Samplers, Steps, stage_options
from dalle2.images import png_bytes, tensor_to_images
from dalle2.precision import inference_precision, resolve_precision
from dalle2.progress_bars import Bar
from dalle2.train.samples import image_grid, similarity_image

REPORT_VERSION = 1
FID_NOTE = (
    "clip_fid is the Frechet distance (FID's formula) between L2-normalised image embeddings of this "
    "cascade's own CLIP, not Inception-v3 pool features: Inception weights cannot be downloaded here. "
    "Values are not comparable with published FIDs, nor between different CLIPs; compare runs that share "
    "the CLIP and the number of images. clip_fid_real_halves (two halves of the real held-out images) is "
    "the floor that sampling noise alone gives at half this many images."
)
GRID_COLUMNS, GRID_PAIRS = 8, 4  # samples.png: up to 4 pairs of rows (generated, real) of 8 images
SIMILARITY_ROWS = 32  # clip_similarity.png: the first rows' caption x image cosines
Progress = Callable[[str], None]


@dataclass(frozen=True)
class EvalSettings:
    bundles: str  # folder (or s3:// prefix) with clip/, prior/, decoder/, upsampler_*/ bundles
    data: str  # dataset folder (or one Parquet file): local, file:// or s3://
    out: str = "eval"  # where report.json and the PNGs go
    count: int = 128  # held-out rows to score (fewer if the split has fewer)
    steps: Steps = field(default_factory=Steps)
    samplers: Samplers = field(default_factory=Samplers)
    seed: int = 0
    validation_fraction: float = 0.05  # must be the training jobs' (data.validation_fraction)
    # "validation": rows no model was trained on; "train": rows they were (to tell generalisation
    # from memorisation on a small dataset)
    split: str = "validation"
    prior_guidance: float = 1.0
    decoder_guidance: float = 3.0  # the pipeline's default (GLIDE-style classifier-free guidance)
    batch_size: int = 32  # rows per model call
    device: str = "cpu"
    # Where the decoder's image embeddings come from when there is a prior: "prior" (text ->
    # image, what users get) or "image" (the held-out images' own CLIP embeddings). Scoring both
    # tells a prior that loses an attribute from a decoder that cannot draw it.
    decode_from: str = "prior"
    low_res_consistency: bool = True  # the pipeline's default (dalle2.cascade.upsample)
    precision: Optional[str] = None  # the networks' precision (dalle2.precision); None = bf16 on CUDA, fp32 on CPU
    # The captions: the rows' own ("dataset"), or rewritten from the shapes dataset's labels in
    # its plain form or in phrasings no training row uses ("held-out"; dalle2.data.shapes).
    phrasing: str = "dataset"
    # The first rows generated again with another seed: do a caption's seeds differ, and as much
    # as the dataset's own images of one caption do (metrics.seed_spread)? 0 = not measured.
    seed_pairs: int = 32

    def __post_init__(self) -> None:
        if self.count < 2 or self.batch_size < 1:
            raise ValueError(f"need count >= 2 (a covariance, a retrieval) and batch_size >= 1, got {self.count}, {self.batch_size}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.split not in ("validation", "train"):
            raise ValueError(f"split must be validation or train, got {self.split!r}")
        if self.decode_from not in ("prior", "image"):
            raise ValueError(f"decode_from must be prior or image, got {self.decode_from!r}")
        if self.phrasing not in PHRASINGS:
            raise ValueError(f"phrasing must be one of {', '.join(PHRASINGS)}, got {self.phrasing!r}")
        resolve_precision(self.precision, self.device)  # raises on an unknown name


@dataclass
class HeldOut:
    """Held-out rows, decoded at CLIP's resolution exactly as training decoded them."""

    keys: list[str]
    captions: list[str]
    encoded: list[bytes]  # the image files, to decode again at the generated size
    images: torch.Tensor  # uint8 [N, S, S, 3] at CLIP's image size
    tokens: torch.Tensor  # int64 [N, L] at CLIP's context length
    labels: Optional[list[dict[str, str]]]  # the shapes dataset's attribute columns, when present

    def __len__(self) -> int:
        return len(self.keys)

    def head(self, n: int) -> "HeldOut":
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return HeldOut(**{name: value[:n] if value is not None else None for name, value in fields.items()})


# --- data ----------------------------------------------------------------------------------


def read_held_out(
    uri: str, count: int, validation_fraction: float, image_size: int, context_length: int, split: str = "validation"
) -> HeldOut:
    """The first ``count`` rows of ``split`` (the validation split unless asked), in file order.
    Other rows are skipped before decoding; files are read in record batches, never whole."""
    files = dataset_files(uri)
    schema = read_schema(files[0])
    check_columns(schema, TRAINING_COLUMNS, files[0])
    label_columns = list(LABEL_COLUMNS) if set(LABEL_COLUMNS) <= set(schema.names) else []
    keys, captions, encoded, images, tokens, labels = [], [], [], [], [], []
    for file_uri in files:
        with storage.open_input(file_uri) as file:
            for record_batch in pq.ParquetFile(file).iter_batches(batch_size=256, columns=[*TRAINING_COLUMNS, *label_columns]):
                batch = {name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in record_batch.schema.names}
                # carry: the encoded image and the label columns, for the rows kept
                carry = {"image": "encoded", **{name: f"label_{name}" for name in label_columns}}
                out, _ = preprocess_batch(
                    batch, image_size=image_size, context_length=context_length, split=split,
                    validation_fraction=validation_fraction, carry=carry,
                )  # fmt: skip
                for j, key in enumerate(out["key"][: count - len(keys)]):
                    keys.append(str(key))
                    captions.append(str(out["caption"][j]))
                    encoded.append(bytes(out["encoded"][j]))
                    images.append(out["image"][j])
                    tokens.append(out["tokens"][j])
                    labels.append({name: str(out[f"label_{name}"][j]) for name in label_columns})
                if len(keys) >= count:
                    break
        if len(keys) >= count:
            break
    if len(keys) < 2:
        raise ValueError(
            f"{uri}: {len(keys)} usable {split} rows at validation_fraction={validation_fraction}; "
            "need at least 2 (use the training jobs' fraction, or a larger dataset)"
        )
    return HeldOut(
        keys, captions, encoded, torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(tokens)),
        labels if label_columns else None,
    )  # fmt: skip


def rephrase(rows: HeldOut, phrasing: str, context_length: int, seed: int = 0) -> HeldOut:
    """The rows with their captions said another way (see EvalSettings.phrasing); the images stay."""
    if phrasing == "dataset":
        return rows
    if rows.labels is None:
        raise ValueError(f"phrasing {phrasing!r} rewrites captions from the shapes dataset's label columns; these rows have none")
    captions = [caption(labels) if phrasing == "plain" else held_out_caption(labels, key, seed) for key, labels in zip(rows.keys, rows.labels)]
    return dataclasses.replace(rows, captions=captions, tokens=tokenize(captions, context_length))


def decode_at(rows: HeldOut, size: int) -> torch.Tensor:
    """The held-out images [N, 3, size, size] in [-1, 1], decoded anew at ``size``."""
    pixels = np.stack([decode_image(data, size) for data in rows.encoded])
    return to_model_images(torch.from_numpy(pixels))


# --- models --------------------------------------------------------------------------------


def _only(by_kind: dict[str, list[Bundle]], kind: str, folder: str) -> Optional[Bundle]:
    found = by_kind.get(kind, [])
    if len(found) > 1:
        raise ValueError(f"{folder}: more than one {kind} bundle")
    return found[0] if found else None


def _batches(n: int, size: int):
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


@torch.no_grad()
def encode_images(clip: Clip, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """CLIP image embeddings [N, D] of images [N, 3, H, W] in [-1, 1]."""
    device = next(clip.parameters()).device
    return torch.cat([clip.encode_image(images[part].to(device)).float().cpu() for part in _batches(len(images), batch_size)])


@torch.no_grad()
def encode_texts(clip: Clip, tokens: torch.Tensor, batch_size: int) -> TextEncoding:
    device = next(clip.parameters()).device
    parts = [clip.encode_text(tokens[part].to(device)) for part in _batches(len(tokens), batch_size)]
    embed, hidden, mask = (torch.cat([getattr(p, name) for p in parts]) for name in ("embed", "hidden", "mask"))
    return TextEncoding(embed.float(), hidden.float(), mask)  # float32 also when CLIP ran under autocast


def _zero_shot(clip: Clip, rows: HeldOut, image_embeds: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Per attribute, CLIP's zero-shot accuracy on the held-out images: each image against the
    plain caption of its labels with that attribute set to each of its values. An attribute CLIP
    has not learned yet the decoder draws badly: it is conditioned on CLIP's image embedding
    (demo runs of 800 and 1,200 CLIP steps: README, "Evaluate")."""
    accuracy = {}
    for name, values in LABEL_VALUES.items():
        captions = [caption({**labels, name: value}) for labels in rows.labels for value in values]
        texts = encode_texts(clip, tokenize(captions, clip.config.context_length), batch_size).embed
        truth = [values.index(labels[name]) for labels in rows.labels]
        accuracy[name] = metrics.zero_shot_accuracy(image_embeds, texts.view(len(rows), len(values), -1), truth)
    return accuracy


def _text_rows(text: TextEncoding, part: slice, device) -> TextEncoding:
    return TextEncoding(text.embed[part].to(device), text.hidden[part].to(device), text.mask[part].to(device))


# --- the evaluation --------------------------------------------------------------------------


def _checker_accuracy(images: torch.Tensor, labels: list[dict[str, str]]) -> dict[str, float]:
    """Share of images whose checked attribute equals the row's label, per attribute, and
    of images right on shape, color and position at once."""
    readings = [read_attributes(np.asarray(image)) for image in tensor_to_images(images)]
    accuracy = {name: float(np.mean([r[name] == l[name] for r, l in zip(readings, labels)])) for name in LABEL_COLUMNS}
    accuracy["shape_color_position"] = float(
        np.mean([all(r[name] == l[name] for name in ("shape", "color", "position")) for r, l in zip(readings, labels)])
    )
    return accuracy


def _grid(generated: torch.Tensor, real: torch.Tensor) -> bytes:
    rows = []
    for start in range(0, min(len(generated), GRID_COLUMNS * GRID_PAIRS), GRID_COLUMNS):
        rows += [generated[start : start + GRID_COLUMNS], real[start : start + GRID_COLUMNS]]
    if len(rows) > 2 and len(rows[-1]) < GRID_COLUMNS:  # image_grid draws equal rows: drop a short tail
        rows = rows[:-2]
    return png_bytes(image_grid(rows))


def _generate(pipe: UnCLIP, rows: HeldOut, embeds: torch.Tensor, settings: EvalSettings, progress: Progress, seed: int = 1) -> torch.Tensor:
    """Images [N, 3, S, S] in [-1, 1] from the held-out captions, through the decoder and the
    upsamplers, with the pipeline's stage functions; one generator, seeded, for all batches."""
    generator = torch.Generator(device=pipe.device).manual_seed(settings.seed + seed)
    decoder_options = stage_options("decoder", settings.steps, settings.samplers, settings.decoder_guidance)
    upsampler_options = stage_options("upsampler", settings.steps, settings.samplers, 1.0)
    images = []
    with Bar(len(rows), "eval: generating", "img") as bar:
        for part in _batches(len(rows), settings.batch_size):
            decoded = decode(pipe.decoder, embeds[part].to(pipe.device), rows.tokens[part].to(pipe.device), decoder_options, generator)
            upsampled = upsample(pipe.upsamplers, decoded, pipe.sizes[-1], upsampler_options, generator, low_res_consistency=settings.low_res_consistency)
            images.append(upsampled.float().cpu())
            bar.update(part.stop - part.start)
    progress(f"generated {len(rows)} images")
    return torch.cat(images)


def run_eval(settings: EvalSettings, progress: Optional[Progress] = None) -> dict[str, Any]:
    """Score every stage in ``settings.bundles``; writes the report and PNGs, returns the report.
    The networks run in ``settings.precision`` (the metrics are computed in float32)."""
    with inference_precision(settings.precision, settings.device):
        return _run_eval(settings, progress)


def _run_eval(settings: EvalSettings, progress: Optional[Progress]) -> dict[str, Any]:
    progress = progress or (lambda message: None)
    started = time.perf_counter()
    wall: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        wall[name] = round(now - since, 3)
        return now

    by_kind = load_bundles(settings.bundles, device=settings.device)
    clip_bundle = _only(by_kind, "clip", settings.bundles)
    if clip_bundle is None:
        raise FileNotFoundError(f"{settings.bundles}: no clip bundle (every evaluation needs CLIP)")
    prior_bundle, decoder_bundle = _only(by_kind, "prior", settings.bundles), _only(by_kind, "decoder", settings.bundles)
    upsamplers = sorted((b.model for b in by_kind.get("upsampler", [])), key=lambda u: u.config.image_size)
    if upsamplers and decoder_bundle is None:
        raise FileNotFoundError(f"{settings.bundles}: upsampler bundles but no decoder to start them from")
    clip: Clip = clip_bundle.model
    stages = [b for kind in ("clip", "prior", "decoder", "upsampler") for b in by_kind.get(kind, [])]
    now = lap("load_bundles", started)

    rows = read_held_out(
        settings.data, settings.count, settings.validation_fraction, clip.config.image_size, clip.config.context_length, settings.split
    )
    rows = rephrase(rows, settings.phrasing, clip.config.context_length, settings.seed)
    now = lap("read_data", now)
    progress(f"{len(rows)} held-out rows from {settings.data}, {settings.phrasing} phrasing")

    # CLIP: does each caption find its image among the held-out images, and back?
    image_embeds = encode_images(clip, to_model_images(rows.images), settings.batch_size)
    text = encode_texts(clip, rows.tokens, settings.batch_size)
    label_tuples = [tuple(l.values()) for l in rows.labels] if rows.labels is not None else None
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "settings": {
            **dataclasses.asdict(settings),
            # what each stage ran with, defaults resolved
            "stages": {name: dataclasses.asdict(stage_options(name, settings.steps, settings.samplers, guidance))
                       for name, guidance in (("prior", settings.prior_guidance), ("decoder", settings.decoder_guidance), ("upsampler", 1.0))},
        },
        "bundles": [{"kind": b.kind, "metadata": b.metadata} for b in stages],
        "data": {
            "uri": settings.data, "held_out_rows": len(rows), "validation_fraction": settings.validation_fraction, "split": settings.split,
            "phrasing": settings.phrasing, "label_columns": list(rows.labels[0]) if rows.labels else [],
        },
        "clip": metrics.retrieval(image_embeds, text.embed, label_tuples),
        "prior": None,
        "generation": None,
        "shapes_checker": None,
        "files": {},
    }  # fmt: skip
    files: dict[str, bytes] = {}
    shown = slice(0, SIMILARITY_ROWS)
    similarity = metrics.clip_features(text.embed[shown]) @ metrics.clip_features(image_embeds[shown]).T
    files["clip_similarity.png"] = png_bytes(similarity_image(similarity))
    if rows.labels is not None:
        report["clip"]["zero_shot"] = _zero_shot(clip, rows, image_embeds, settings.batch_size)
    now = lap("clip", now)

    embeds, conditioning = image_embeds, "true_image_embeddings"
    if prior_bundle is not None:
        prior = prior_bundle.model
        generator = torch.Generator(device=settings.device).manual_seed(settings.seed)
        options = stage_options("prior", settings.steps, settings.samplers, settings.prior_guidance)
        predicted = torch.cat([
            sample_image_embeds(prior, _text_rows(text, part, settings.device), options, generator).float().cpu()
            for part in _batches(len(rows), settings.batch_size)
        ])  # fmt: skip
        report["prior"] = metrics.prior_cosine(predicted, image_embeds, text.embed, prior.image_mean.cpu())
        if settings.decode_from == "prior":
            embeds, conditioning = predicted, "prior"
        now = lap("prior", now)
        progress("prior scored")

    if decoder_bundle is not None:
        pipe = UnCLIP(clip, prior_bundle.model if prior_bundle else None, decoder_bundle.model, upsamplers)
        generated = _generate(pipe, rows, embeds, settings, progress)
        now = lap("generate", now)
        real = decode_at(rows, pipe.sizes[-1])
        generated_embeds = encode_images(clip, generated, settings.batch_size)
        real_embeds = encode_images(clip, real, settings.batch_size)
        half = len(rows) // 2
        report["generation"] = {
            "conditioning": conditioning,  # where the decoder's image embeddings came from
            "image_size": pipe.sizes[-1],
            "images": len(rows),
            "clip_score": metrics.clip_score(generated_embeds, text.embed),
            "clip_score_std": metrics.clip_score_std(generated_embeds, text.embed),  # over images
            "clip_score_real": metrics.clip_score(real_embeds, text.embed),  # the same captions with their real images
            "clip_fid": metrics.frechet_distance(metrics.clip_features(generated_embeds), metrics.clip_features(real_embeds)),
            "clip_fid_real_halves": (
                metrics.frechet_distance(metrics.clip_features(real_embeds[:half]), metrics.clip_features(real_embeds[half:]))
                if half >= 2 else None
            ),
            "fid_features": FID_NOTE,
            "captions_in_samples": rows.captions[: GRID_COLUMNS * GRID_PAIRS],
        }  # fmt: skip
        if rows.labels is not None:
            report["shapes_checker"] = {
                "generated": _checker_accuracy(generated, rows.labels),
                "real": _checker_accuracy(real, rows.labels),  # the checker's own error on real images
            }
        pairs = min(settings.seed_pairs, len(rows))
        if pairs >= 2:
            again = _generate(pipe, rows.head(pairs), embeds[:pairs], settings, progress, seed=2)
            data = None
            if rows.labels is not None:  # the shapes dataset: two draws of each caption's scene
                data = tuple(to_model_images(torch.from_numpy(d)) for d in draw_twice(rows.labels[:pairs], pipe.sizes[-1], settings.seed))
            report["generation"]["seed_spread"] = metrics.seed_spread(generated[:pairs], again, data)
        files["samples.png"] = _grid(generated, real)
        now = lap("score_images", now)

    wall["total"] = round(time.perf_counter() - started, 3)
    report["wall_time_s"] = wall
    report["files"] = {name.split(".")[0]: storage.join(settings.out, name) for name in [*files, "report.json"]}
    for name, data in files.items():
        storage.write_bytes(storage.join(settings.out, name), data)
    storage.write_bytes(storage.join(settings.out, "report.json"), json.dumps(report, indent=2).encode())
    return report


def summary(report: dict[str, Any]) -> str:
    """A few lines for people; report.json has everything."""
    data, clip = report["data"], report["clip"]
    lines = [
        f"{data['split']} rows: {data['held_out_rows']} (validation fraction {data['validation_fraction']}) from {data['uri']}, "
        f"{data.get('phrasing', 'dataset')} phrasing",
        f"clip retrieval: text->image top1 {clip['text_to_image_top1']:.3f} top5 {clip['text_to_image_top5']:.3f}, "
        f"image->text top1 {clip['image_to_text_top1']:.3f} top5 {clip['image_to_text_top5']:.3f} (chance top1 {clip['chance_top1']:.3f})",
    ]
    if "text_to_image_top1_same_labels" in clip:
        lines.append(f"clip retrieval, nearest image has the caption's labels: {clip['text_to_image_top1_same_labels']:.3f}")
    if "zero_shot" in clip:
        accuracy = " ".join(f"{name} {value:.2f}" for name, value in clip["zero_shot"].items())
        lines.append(f"clip zero-shot per attribute (the labels' caption against each other value): {accuracy}")
    prior = report["prior"]
    if prior is not None:
        lines.append(
            f"prior cosine: {prior['cosine']:.3f} (baselines: text embedding {prior['baseline_text_embedding']:.3f}, "
            f"mean image embedding {prior['baseline_mean_image_embedding']:.3f})"
        )
    generation = report["generation"]
    if generation is not None:
        halves = generation["clip_fid_real_halves"]
        lines.append(
            f"generated {generation['images']} images at {generation['image_size']}px from {generation['conditioning']}: "
            f"CLIP score {generation['clip_score']:.3f} (real {generation['clip_score_real']:.3f}), "
            f"CLIP-feature FID {generation['clip_fid']:.4f}" + (f" (real halves {halves:.4f})" if halves is not None else "")
        )
        spread = generation.get("seed_spread")
        if spread is not None:
            data = f"the data's own 2 images of a caption {spread['data']:.3f}, ratio {spread['ratio']:.2f}; " if spread["ratio"] is not None else ""
            lines.append(f"seed spread: 2 seeds of a caption differ by {spread['seeds']:.3f} mean |pixel| ({data}"
                         f"different captions {spread['different_captions']:.3f}; {spread['pairs']} captions)")  # fmt: skip
    checker = report["shapes_checker"]
    if checker is not None:
        for which in ("generated", "real"):
            accuracy = " ".join(f"{name} {value:.2f}" for name, value in checker[which].items())
            lines.append(f"shapes checker on {which} images: {accuracy}")
    lines.append(f"wrote {', '.join(report['files'].values())} in {report['wall_time_s']['total']:.1f} s")
    return "\n".join(lines)
