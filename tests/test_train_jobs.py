"""The four training jobs on a real Ray cluster: 2 CPU workers, DeepSpeed ZeRO-2 and ZeRO-3, gloo.

Each job trains a few steps and its loss goes down (the prior from images and from the rows of
``dalle2 data embed``, the decoder from those rows, with no CLIP on the workers); a run resumes by name where it stopped
(steps, data position, LR schedule); a worker that fails once is replaced and the run still
reaches its step count; a ZeRO-3 run exports to a bundle whose outputs equal the engine's;
data and runs can both live in s3:// (the SeaweedFS fixture), and an export from s3:// fetches only
the files it reads (no optimizer state for the EMA) and gets the whole checkpoint's weights.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image
from ray import cloudpickle
from safetensors.torch import load_file, save_file

from dalle2.bundle import load_bundle
from dalle2.clip import tokenize
from dalle2.data import storage
from dalle2.data.embed import EmbedConfig, embed_dataset
from dalle2.data.shapes import write_shapes_dataset
from dalle2.train.checkpoint import check_complete, local_copy, local_files, read_data_position, read_train_state
from dalle2.train.config import deep_merge, load_job_config
from dalle2.train.export import _model_shapes, consolidated_weights, ema_weights, export_copy, export_run, trained_state
from dalle2.train.launch import run_job
from dalle2.train.loop import TrainHooks
from dalle2.train.progress import read_metrics
from dalle2.train.schedule import learning_rate

pytestmark = pytest.mark.slow

# Hooks defined here travel to the workers by value (the workers cannot import this test module).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

VALIDATION_FRACTION = 0.1
BATCH = 8


def tiny_job(job: str, data_path: str, storage_uri: str, name: str, **sections):
    """A few steps of the tiny preset on 2 CPU workers; ``sections`` override the defaults."""
    overrides = {
        "data": {"path": data_path, "validation_fraction": VALIDATION_FRACTION},
        "run": {"storage": storage_uri, "name": name},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 2},
        "loop": {
            "max_steps": 8, "batch_size": BATCH, "log_every": 2, "val_every": 0, "val_batches": 1,
            "checkpoint_every": 4, "sample_count": 4, "sample_steps": 2, "ema_decay": 0.9,
        },
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
    }  # fmt: skip
    return load_job_config(job, overrides=deep_merge(overrides, sections))


def losses(run_uri: str) -> list[float]:
    return [float(row["loss"]) for row in read_metrics(storage.join(run_uri, "metrics.csv"))]


def check_partial_export(checkpoint: str, weights: str, ema_gap: bool = False) -> dict[str, torch.Tensor]:
    """Exports ``weights`` of an s3:// checkpoint the way `dalle2 export` fetches it (only the files
    it reads) and checks that the state is, tensor for tensor, that of the whole checkpoint copied
    and consolidated (the fp32 master weights, the EMA over them), which it returns. ``ema_gap``:
    the EMA lacks parameters, so the EMA's export must fetch the master weights too."""
    files = check_complete(checkpoint)["files"]
    lines: list[str] = []
    with export_copy(checkpoint, weights, log=lines.append) as folder:
        fetched = local_files(folder)
        state = trained_state(folder, weights)
    with local_copy(checkpoint) as whole:  # every file of every rank
        expected = consolidated_weights(whole)
        if weights == "ema":
            expected.update(ema_weights(whole))
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name

    optimizer = {name for name in files if name.endswith("_optim_states.pt")}
    ema_slices = {name for name in files if name.startswith("ema/rank-")}
    assert optimizer and ema_slices and set(fetched) <= set(files) | {"manifest.json"}, sorted(files)
    if weights == "ema" and not ema_gap:  # the EMA covers every parameter: no optimizer state fetched
        assert not optimizer & set(fetched) and ema_slices <= set(fetched), sorted(fetched)
    elif weights == "ema":
        assert optimizer <= set(fetched) and ema_slices <= set(fetched), sorted(fetched)
        assert lines.pop(0).startswith("export: the EMA has no average of 1 weights"), lines
    else:  # what zero_to_fp32 reads, not the EMA or the data positions
        assert optimizer <= set(fetched) and not {name for name in fetched if name.startswith(("ema/rank-", "data/"))}, sorted(fetched)
    assert len(lines) == 1 and lines[0].startswith(f"export ({weights}) fetched {len(fetched)} files"), lines
    print(f"\n{lines[0]}; {sum(fetched.values())} of {sum(files.values())} bytes")
    return expected


class FailOnce(TrainHooks):
    """Rank 1 raises after step ``step``, the first time only (a marker file remembers)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def after_step(self, step: int, rank: int) -> None:
        if step == self.step and rank == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError(f"injected failure at step {step}")


def probe(model, config) -> dict[str, torch.Tensor]:
    """Outputs of the model on fixed inputs (the same on every rank: collective under ZeRO-3)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if hasattr(config, "model_name"):  # CLIP
            images = torch.rand(4, 3, config.image_size, config.image_size, generator=generator) * 2 - 1
            tokens = tokenize(["a red circle", "a small blue square", "a green triangle at the top", "x"], config.context_length)
            image, text = model(images, tokens)
            return {"image": image, "text": text}
        x = torch.randn(4, config.embed_dim, generator=generator)
        t = torch.tensor([0, 10, 500, 999])
        hidden = torch.randn(4, config.context_length, config.text_width, generator=generator)
        mask = torch.arange(config.context_length)[None] < torch.tensor([[3], [5], [1], [9]])
        out = model.net(x, t, text_embed=torch.randn(4, config.embed_dim, generator=generator), text_hidden=hidden, text_mask=mask)
        return {"net": out, "normalized": model.normalize(x)}


class Probe(TrainHooks):
    def __init__(self, path: str):
        self.path = path

    def at_end(self, model, rank: int) -> None:
        model.eval()
        outputs = probe(model, model.config)
        if rank == 0:
            torch.save(outputs, self.path)


def test_clip_trains_and_resumes_by_name(ray_cluster, train_shapes, tmp_path):
    runs = str(tmp_path / "runs")
    no_validation = {"val_batches": 0}
    first = run_job(tiny_job("clip", train_shapes, runs, "clip-resume", loop=no_validation))
    assert first.metrics["step"] == 8 and first.checkpoint_uri.endswith("checkpoint-00000008")

    job = tiny_job("clip", train_shapes, runs, "clip-resume", loop={**no_validation, "max_steps": 12})
    probe_path = str(tmp_path / "engine-outputs.pt")
    second = run_job(job, hooks=Probe(probe_path))
    assert second.metrics["step"] == 12
    rows = read_metrics(storage.join(second.run_uri, "metrics.csv"))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]  # continued at 9, not from 1
    assert [int(r["samples"]) for r in rows] == [s * 2 * BATCH for s in (2, 4, 6, 8, 10, 12)]
    assert float(rows[-1]["lr"]) == pytest.approx(learning_rate(11, job.optim, 12))  # the schedule went on
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    folder = storage.path_of(second.checkpoint_uri)
    positions = [read_data_position(folder, rank) for rank in range(2)]
    # Each worker reads 80 of its own sequence entries per epoch (about 72 training rows: 9 batches
    # of 8), so 12 batches end in its second epoch: the data position went on too.
    assert [p.epoch for p in positions] == [1, 1] and all(0 < p.position <= 80 for p in positions)
    assert read_train_state(folder).epoch == 1
    kept = sorted(n for n in os.listdir(second.run_uri) if n.startswith("checkpoint-"))
    assert kept == ["checkpoint-00000008", "checkpoint-00000012"]  # keep_checkpoints: 2

    bundle = load_bundle(export_run(second.run_uri, str(tmp_path / "clip-bundle")))  # no EMA: the trained weights
    engine_outputs = torch.load(probe_path)
    for name, value in probe(bundle.model, bundle.config).items():
        torch.testing.assert_close(value, engine_outputs[name], atol=1e-5, rtol=1e-4)


def test_prior_recovers_from_a_failed_worker(ray_cluster, train_shapes, tiny_clip_bundle, tmp_path):
    marker = str(tmp_path / "failed-once")
    job = tiny_job(
        "prior", train_shapes, str(tmp_path / "runs"), "prior-fault", clip=tiny_clip_bundle,
        loop={"max_steps": 12, "batch_size": 16, "log_every": 4, "val_batches": 0}, run={"max_failures": 1},
    )  # fmt: skip
    result = run_job(job, hooks=FailOnce(step=6, marker=marker))
    assert os.path.exists(marker)  # it did fail
    assert result.metrics["step"] == 12 and result.checkpoint_uri.endswith("checkpoint-00000012")
    steps = [int(r["step"]) for r in read_metrics(storage.join(result.run_uri, "metrics.csv"))]
    assert steps == [4, 8, 12]  # the failure came before step 8's report; the restart from step 4 reported it
    loss = losses(result.run_uri)
    assert loss[-1] < loss[0]


@pytest.fixture(scope="module")
def shapes_embeddings(ray_cluster, train_shapes, tiny_clip_bundle, tmp_path_factory) -> str:
    """`dalle2 data embed` of the training shapes (images kept), computed once for the prior and the decoder."""
    embeddings = str(tmp_path_factory.mktemp("embeddings") / "shapes")
    embed_dataset(EmbedConfig(data=train_shapes, out=embeddings, clip=tiny_clip_bundle, batch_size=40, accelerator="cpu"))
    return embeddings


def test_prior_zero3_from_embeddings_exports_a_bundle_with_the_engines_outputs(ray_cluster, s3_server, shapes_embeddings, tiny_clip_bundle, tmp_path):
    # From the embeddings `dalle2 data embed` computed once: no CLIP runs on the workers.
    probe_path = str(tmp_path / "engine-outputs.pt")
    job = tiny_job(
        "prior", shapes_embeddings, str(tmp_path / "runs"), "prior-zero3", clip=tiny_clip_bundle, data={"format": "embeddings"},
        deepspeed={"zero_stage": 3}, loop={"max_steps": 6, "val_batches": 1},
    )  # fmt: skip
    result = run_job(job, hooks=Probe(probe_path))
    engine_outputs = torch.load(probe_path)

    raw = load_bundle(export_run(result.run_uri, str(tmp_path / "raw"), weights="raw"))
    assert raw.kind == "prior" and raw.metadata["step"] == 6
    for name, value in probe(raw.model, raw.config).items():
        torch.testing.assert_close(value, engine_outputs[name], atol=1e-5, rtol=1e-4)

    averaged = load_bundle(export_run(result.run_uri, str(tmp_path / "ema")))  # the EMA, from every rank's slices
    assert not torch.allclose(probe(averaged.model, averaged.config)["net"], engine_outputs["net"], atol=1e-4)
    torch.testing.assert_close(averaged.model.image_std, raw.model.image_std)
    with Image.open(os.path.join(result.run_uri, "samples", "step-00000006.png")) as heatmap:
        assert heatmap.mode == "L"  # sampled vs true embedding similarities, drawn with the gathered EMA

    # The same checkpoint in S3: an export fetches rank 0's ZeRO-3 model states (the buffers) and
    # the EMA slices, not the optimizer states, and gets the weights of the whole checkpoint.
    uploaded = s3_server.uri("prior-zero3/checkpoint-00000006")
    filesystem, path = storage.resolve(uploaded)
    pafs.copy_files(result.checkpoint_uri, path, destination_filesystem=filesystem)
    check_partial_export(uploaded, "ema")

    # An EMA that lacks a parameter: the export says so and takes it from the fp32 master weights.
    gap = tmp_path / "ema-gap"
    shutil.copytree(result.checkpoint_uri, gap)
    layout = json.loads((gap / "ema" / "layout.json").read_text())
    dropped = sorted(layout["shapes"])[0]
    del layout["shapes"][dropped]
    (gap / "ema" / "layout.json").write_text(json.dumps(layout))
    for rank in range(2):
        slices = load_file(str(gap / "ema" / f"rank-{rank:05d}.safetensors"))
        save_file({name: value for name, value in slices.items() if name != dropped}, str(gap / "ema" / f"rank-{rank:05d}.safetensors"))
    manifest = json.loads((gap / "manifest.json").read_text())
    manifest["files"].update({name: size for name, size in local_files(str(gap)).items() if name.startswith("ema/")})
    (gap / "manifest.json").write_text(json.dumps(manifest))
    uploaded = s3_server.uri("prior-zero3-ema-gap/checkpoint-00000006")
    pafs.copy_files(str(gap), storage.resolve(uploaded)[1], destination_filesystem=filesystem)
    state = check_partial_export(uploaded, "ema", ema_gap=True)
    with local_copy(uploaded) as whole:
        torch.testing.assert_close(state[dropped], consolidated_weights(whole)[dropped], rtol=0, atol=0)


def test_decoder_trains_from_embeddings_and_draws_samples(ray_cluster, shapes_embeddings, tiny_clip_bundle, tmp_path, monkeypatch):
    # The embed rows keep the images: the workers decode them (the image pipeline, same split and
    # drops) and take image_embed from the row. The task on the workers has no CLIP at all, so a
    # batch without image_embed would fail the run. (From images, CLIP on the workers: the prior's
    # fault test above, and test_train_tasks.)
    job = tiny_job(
        "decoder", shapes_embeddings, str(tmp_path / "runs"), "decoder", clip=tiny_clip_bundle,
        data={"format": "embeddings"}, loop={"val_every": 2},
    )  # fmt: skip
    assert not job.loads_clip
    import ray

    from dalle2.data import ray_reader

    counters, make_counter = [], ray_reader.dropped_rows_counter
    monkeypatch.setattr(ray_reader, "dropped_rows_counter", lambda: counters.append(make_counter()) or counters[-1])
    result = run_job(job)
    with pytest.raises(ray.exceptions.RayActorError):  # the run's dropped-rows counter ends with it
        ray.get(counters[0].totals.remote(), timeout=30)
    # The per-batch loss swings with the timesteps drawn (CI saw step 8 above step 2): judge by the
    # validation loss, a fixed batch with fixed noise and timesteps, at steps 2 and 8.
    rows = read_metrics(storage.join(result.run_uri, "metrics.csv"))
    validation = [float(row["val_loss"]) for row in rows if row.get("val_loss")]
    assert result.metrics["step"] == 8 and len(validation) == 4 and validation[-1] < validation[0], validation
    assert result.dropped_rows == {}
    for step in (4, 8):
        with Image.open(os.path.join(result.run_uri, "samples", f"step-{step:08d}.png")) as grid:
            assert grid.mode == "RGB" and grid.width > grid.height  # one row of truth, one of samples


class ConvDtypes(TrainHooks):
    """Writes the dtypes the model's convolutions computed in while training (rank 0; not in
    validation or the sample grid, which run the model in eval mode)."""

    def __init__(self, path: str):
        self.path, self.seen = path, set()

    def at_start(self, model, rank: int) -> None:
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(self.record)

    def record(self, conv, inputs, output) -> None:  # a hook that returned a value would replace the output
        if conv.training:
            self.seen.add(str(output.dtype))

    def at_end(self, model, rank: int) -> None:
        if rank == 0:
            with open(self.path, "w") as file:
                json.dump({"convolutions": sorted(self.seen), "parameters": sorted({str(p.dtype) for p in model.parameters()})}, file)


def test_upsampler_trains_from_s3_into_s3_under_bf16_autocast(ray_cluster, s3_server, tmp_path):
    data = s3_server.uri("upsampler-data")
    write_shapes_dataset(data, count=160, image_size=64, rows_per_file=80)  # the tiny 32->64 stage's target size
    runs = s3_server.uri("runs")
    # v-prediction's per-batch loss swings with the timesteps drawn, more than 8 steps improve it:
    # judge by the validation loss (a fixed batch and fixed noise) at steps 2 and 8. The forward
    # runs under bf16 autocast over fp32 weights (deepspeed.autocast; the CPU configs' auto turns
    # it on where the CPU has bf16 arithmetic), and still learns.
    dtypes = str(tmp_path / "dtypes.json")
    job = tiny_job("upsampler", data, runs, "upsampler-s3", loop={"val_every": 2}, deepspeed={"autocast": "bf16"})
    result = run_job(job, hooks=ConvDtypes(dtypes))
    with open(dtypes) as file:
        assert json.load(file) == {"convolutions": ["torch.bfloat16"], "parameters": ["torch.float32"]}
    assert result.run_uri.startswith("s3://") and result.checkpoint_uri == f"{runs}/upsampler-s3/checkpoint-00000008"
    rows = read_metrics(storage.join(result.run_uri, "metrics.csv"))
    validation = [float(row["val_loss"]) for row in rows if row.get("val_loss")]
    assert result.metrics["step"] == 8 and len(validation) == 4 and validation[-1] < validation[0], validation
    assert storage.exists(storage.join(result.run_uri, "samples", "step-00000008.png"))

    bundle = load_bundle(export_run(result.run_uri, s3_server.uri("bundles")))
    assert bundle.kind == "upsampler_256" and bundle.metadata["checkpoint"] == result.checkpoint_uri
    # The bundle holds the weights of the whole checkpoint though its export fetched no optimizer state.
    expected = check_partial_export(result.checkpoint_uri, "ema")
    weights = bundle.model.state_dict()
    for name, tensor in _model_shapes(expected, weights).items():
        assert torch.equal(weights[name], tensor), name
    check_partial_export(result.checkpoint_uri, "raw")
