"""The orchestration `make demo` uses, end to end at the smallest sizes, and its bad input."""

import contextlib
import io
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import urllib.request

import pytest
import yaml
from PIL import Image

from jobs.stages import load_pipeline_config, run_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "jobs", "configs")


def _write_config(tmp_path, **changes):
    config = {
        "workdir": str(tmp_path / "work"),
        "shapes": {"count": 96, "size": 32, "seed": 0},
        "clip": {"config": os.path.join(CONFIGS, "clip-tiny-cpu.yaml"), "max_steps": 3},
        "embed": {"batch_size": 32, "accelerator": "cpu"},
        "prior": {"config": os.path.join(CONFIGS, "prior-tiny-cpu.yaml"), "max_steps": 3},
        "decoder": {"config": os.path.join(CONFIGS, "decoder-tiny-cpu.yaml"), "max_steps": 3},
        "upsampler": {"config": os.path.join(CONFIGS, "upsampler-tiny-cpu.yaml"), "max_steps": 3},
        "eval": {"count": 4, "steps": "2", "batch_size": 4},
        "serve": {"prompts": ["a large red circle at the top left on a white background"], "n": 2},
        **changes,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


OUR_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")  # Console.say's timestamp: every console line is ours


@contextlib.contextmanager
def another_local_ray_with_a_dashboard():
    """A second Ray on this machine, with its dashboard (at 8265 when free, Ray's default), as a
    second `dalle2 train` beside the demo would start. Ends (and stops its Ray) when its stdin closes."""
    code = (
        "import ray, sys; c = ray.init(address='local', num_cpus=1, include_dashboard=True, dashboard_host='127.0.0.1');"
        "print(c.dashboard_url, flush=True); sys.stdin.read()"
    )
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "RAY_ADDRESS": ""})  # fmt: skip
    try:
        yield other.stdout.readline().strip()
    finally:
        other.stdin.close()
        other.wait(timeout=60)


def _dashboard_request(url: str) -> urllib.request.Request:
    """Ray's local clusters require their token (``ray get-auth-token``, kept in ~/.ray/auth_token)."""
    token_file = pathlib.Path.home() / ".ray" / "auth_token"
    token = os.environ.get("RAY_AUTH_TOKEN") or (token_file.read_text().strip() if token_file.exists() else "")
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})


def _logs(work) -> dict[str, str]:
    return {path.name: path.read_text(errors="replace") for path in (work / "logs").glob("*.log")}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_full_pipeline_returns_images_over_http_and_resumes(tmp_path, monkeypatch):
    """The demo end to end at the smallest sizes, and the console contract: headers, our progress
    lines and summaries only, the rest in the run's logs; the dashboard up; a second Ray with its
    own dashboard beside it changes nothing; TensorBoard and MLflow get the runs."""
    path = _write_config(tmp_path)
    work = tmp_path / "work"
    # MLflow 3 keeps its file store behind MLFLOW_ALLOW_FILE_STORE (a database is its default now).
    mlflow = {"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": REPO, **mlflow}
    with another_local_ray_with_a_dashboard() as other_dashboard, open(tmp_path / "stderr", "w+") as stderr:
        run = subprocess.Popen([sys.executable, "-m", "jobs.stages", "--config", str(path)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
        console, dashboard_version = [], None
        for line in run.stdout:
            console.append(line.rstrip("\n"))
            if "Ray dashboard: " in line:  # asked while the pipeline runs
                url = line.split("Ray dashboard: ", 1)[1].split()[0]
                with urllib.request.urlopen(_dashboard_request(url + "/api/version"), timeout=30) as reply:
                    dashboard_version = json.loads(reply.read())
        assert run.wait(timeout=1200) == 0, "\n".join(console[-40:]) + stderr.read()[-3000:]
        stderr.seek(0)
        assert stderr.read() == ""
    text = "\n".join(console)
    assert dashboard_version and dashboard_version.get("ray_version"), text
    assert other_dashboard.rsplit(":", 1)[-1] != url.rsplit(":", 1)[-1], (other_dashboard, url)  # ours is not the default one
    assert all(OUR_LINE.match(line) for line in console), [line for line in console if not OUR_LINE.match(line)]
    for job in ("prior", "decoder"):  # CLIP ran once, in the embed stage
        assert f"{job}: training tiny {job} for 3 steps from the embeddings" in text, text
        assert f"{job} step 3/3 (100%)" in text and f"log    {work / 'logs' / job}.log" in text
        assert re.search(rf"{job}: done in 0:\d\d:\d\d \| loss [\d.]+ \| val [\d.]+ \| bundle {work / 'bundles' / job}", text)
    assert "tensorboard --logdir" in text and "dalle2 serve --bundles" in text
    # the quality check: the checker's accuracy per phrasing beside the targets, its reports kept
    assert "== eval: dalle2 eval on 4 held-out rows per phrasing (dataset, held-out)" in text and "held-out phrasings" in text
    assert re.search(r"shape +[\d.]+ +[\d.]+ +>= 0.80 (met|NOT MET)", text), text
    assert (work / "eval" / "held-out" / "report.json").exists()
    logs = _logs(work)
    assert "pid=" in logs["decoder.log"] and "deepspeed" in logs["decoder.log"].lower()  # the workers' output, kept
    assert not any("Failed to query Ray Train Controller" in log or "Cleaning up placement group" in log for log in logs.values())

    grid = Image.open(work / "demo-grid.png")
    assert grid.size == (2 * 66 + 2, 68)  # 2 images of 64px (32 -> 64 upsampler), 2px padding
    for bundle in ("clip", "prior", "decoder", "upsampler_256"):
        assert (work / "bundles" / bundle / "config.json").exists()
    assert (work / "embeddings" / "embed.json").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _check_tracking(work / "runs" / "decoder", tmp_path / "mlruns")

    # Rerun, --verbose: every stage is skipped, serving is not reached; Ray's own lines are back.
    rerun = subprocess.run([sys.executable, "-m", "jobs.stages", "--config", str(path), "--stop-after", "upsampler", "--verbose"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("exists, skipped") == 6, rerun.stdout
    assert "Started a local Ray instance" in rerun.stdout + rerun.stderr
    assert _logs(work)["ray.log"].count("Started a local Ray instance") == 2  # --verbose: the logs are written all the same
    assert "Started a local Ray instance" in logs["ray.log"] and "Started a local Ray instance" not in text


def _check_tracking(run, mlruns) -> None:
    """TensorBoard's own reader finds the scalars and the sample grid; MLflow's file store the metrics."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "val_loss", "lr", "samples_per_s"} <= set(tags["scalars"]) and "samples" in tags["images"], tags
    assert [event.step for event in events.Scalars("loss")][-1] == 3
    (image,) = events.Images("samples")
    assert Image.open(io.BytesIO(image.encoded_image_string)).size == (image.width, image.height)

    client = MlflowClient(mlruns.as_uri())
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("dalle2").experiment_id])}
    assert {"clip", "prior", "decoder", "upsampler"} <= set(runs), list(runs)
    assert [m.step for m in client.get_metric_history(runs["decoder"].info.run_id, "loss")][-1] == 3
    assert runs["decoder"].data.metrics["val_loss"] > 0 and runs["decoder"].info.status == "FINISHED"


def test_missing_dataset_is_one_clear_error(tmp_path):
    config = load_pipeline_config(str(_write_config(tmp_path, data=str(tmp_path / "nowhere"))))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_pipeline(config)
    assert not (tmp_path / "work" / "bundles").exists()  # nothing half-written


def test_a_taken_serve_port_is_refused_before_any_stage(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        path = _write_config(tmp_path, serve={"prompts": ["a red circle"], "n": 1, "port": port})
        with pytest.raises(ValueError, match=f"127.0.0.1:{port} is already in use"):
            run_pipeline(load_pipeline_config(str(path)))
        assert not (tmp_path / "work").exists()  # not even the dataset was written


def test_stage_without_its_input_bundle_is_a_clear_error(tmp_path, ray_cluster):
    from jobs.stages import stage_data, stage_train

    config = load_pipeline_config(str(_write_config(tmp_path)))
    stage_data(config)
    with pytest.raises(FileNotFoundError, match="input bundle .*clip is absent"):
        stage_train(config, "prior", config.prior)
    assert not (tmp_path / "work" / "bundles" / "prior").exists()


def test_embed_stage_needs_clip_and_the_prior_needs_the_embeddings(tmp_path):
    from dalle2.bundle import save_bundle
    from dalle2.factory import create_model
    from jobs.stages import stage_embed, stage_train

    config = load_pipeline_config(str(_write_config(tmp_path)))
    with pytest.raises(FileNotFoundError, match="embed: its input bundle .*clip is absent"):
        stage_embed(config, config.embed)
    assert not (tmp_path / "work" / "embeddings").exists()
    save_bundle(create_model("clip", "tiny"), "clip", config.bundle("clip"))
    for job in ("prior", "decoder"):
        with pytest.raises(FileNotFoundError, match=f"{job}: its input embeddings .*embeddings are absent or incomplete"):
            stage_train(config, job, getattr(config, job))
    assert not (tmp_path / "work" / "runs").exists()


def test_embed_stage_redoes_an_incomplete_output_then_skips(tmp_path, ray_cluster, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dalle2.bundle import save_bundle
    from dalle2.data.schema import read_dataset
    from dalle2.factory import create_model
    from jobs.stages import stage_data, stage_embed

    config = load_pipeline_config(str(_write_config(tmp_path, shapes={"count": 24, "size": 32, "seed": 0})))
    stage_data(config)
    save_bundle(create_model("clip", "tiny"), "clip", config.bundle("clip"))
    partial = tmp_path / "work" / "embeddings"
    partial.mkdir()
    pq.write_table(pa.table({"key": ["left over"]}), partial / "part-left-over.parquet")  # an interrupted run's, no manifest

    assert stage_embed(config, config.embed) == config.embeddings_uri
    assert "removing the incomplete output" in capsys.readouterr().out
    assert not (partial / "part-left-over.parquet").exists() and (partial / "embed.json").exists()
    rows = read_dataset(config.embeddings_uri, columns=["key", "image"])
    assert rows.num_rows == 24 and len(set(rows["key"].to_pylist())) == 24

    stage_embed(config, config.embed)
    assert "embed: " + config.embeddings_uri + " exists, skipped" in capsys.readouterr().out


def test_unknown_pipeline_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        load_pipeline_config(str(_write_config(tmp_path, decoders={"config": "x"})))
    with pytest.raises(ValueError, match="embed.accelerator: 'tpu' is not one of auto, cpu, gpu"):
        load_pipeline_config(str(_write_config(tmp_path, embed={"accelerator": "tpu"})))
    assert load_pipeline_config(str(_write_config(tmp_path, embed=None))).embed is None  # prior and decoder from images
