"""Experiment tracking (`--log tensorboard,mlflow,wandb`): what train, caption train and ablate record, read back
with each library's own reader (TensorBoard's event accumulator, MlflowClient, W&B's offline run file), and the
one-line refusals (a missing extra, an unknown tracker, a tracking URI that cannot be written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from vlmcache.align.ablate import Cell
from vlmcache.align.config import TrainConfig
from vlmcache.app import workflows
from vlmcache.caption.config import CaptionConfig
from vlmcache.data.synthetic import write_synthetic_cache
from vlmcache.errors import VlmcacheError
from vlmcache.run.tracking import check_tracking

BLOCK = 32768  # W&B's run file is a LevelDB-style log of 32 KiB blocks


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """64 train + 16 val images, two captions each, 16-d features: 4 steps per epoch at batch 16."""
    return write_synthetic_cache(tmp_path_factory.mktemp("tracking") / "cache", 64, val_images=16, dim=16,
                                 captions_per_image=2)


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the TensorBoard event files in `logdir`, read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_tags(logdir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events.Tags()


def mlflow_runs(uri: Path, experiment: str) -> list:
    """Every MLflow run of an experiment in a file store, read by MlflowClient."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri.resolve().as_uri())
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def wandb_records(run_file: Path) -> list:
    """The protobuf records of a W&B offline run file (`wandb sync` reads the same; wandb ships no Python reader)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset = [], b"", 7  # after the file header: ':W&B', magic, version
    while offset + 7 <= len(data):
        if BLOCK - offset % BLOCK < 7:  # too little room for a record header: the block is padded
            offset += BLOCK - offset % BLOCK
            continue
        length, kind = int.from_bytes(data[offset + 4:offset + 6], "little"), data[offset + 6]
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(folder: Path) -> dict:
    """(the run record, history rows, config keys, saved file names) of the only W&B offline run in `folder`."""
    run_files = list(folder.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    found: dict = {"history": [], "config": set(), "files": set(), "run": None}
    for record in wandb_records(run_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            found["history"].append({item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                                     for item in record.history.item})
        elif kind == "config":
            found["config"] |= {item.nested_key[0] if item.nested_key else item.key for item in record.config.update}
        elif kind == "files":
            found["files"] |= {file.path for file in record.files.files}
        elif kind == "run":
            found["run"] = record.run
    return found


def test_train_records_steps_epochs_config_and_files_in_every_tracker(cache, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    config = TrainConfig(projector="linear", epochs=2, batch_size=16, log="tensorboard,mlflow,wandb")
    result = workflows.train(cache, run, config)
    steps, val = [1, 2, 3, 4, 5, 6, 7, 8], [record["val_mean_recall"] for record in result.history]

    curves = scalars(run / "tensorboard")
    assert [step for step, _ in curves["step/loss"]] == steps and len(curves["step/lr"]) == 8
    assert curves["epoch/val_mean_recall"] == [(4, pytest.approx(val[0])), (8, pytest.approx(val[1]))]
    assert curves["best/mean_recall"] == [(8, pytest.approx(result.best_metrics["mean_recall"]))]
    tags = tensorboard_tags(run / "tensorboard")
    assert "files/training.png" in tags["images"] and "config/text_summary" in tags["tensors"]
    assert {"files/metrics.jsonl/text_summary", "files/best.json/text_summary"} <= set(tags["tensors"])

    [mlflow_run] = mlflow_runs(run / "mlruns", "vlmcache")
    assert mlflow_run.info.run_name == "run" and mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["projector"] == "linear" and mlflow_run.data.params["epochs"] == "2"
    assert "log" not in mlflow_run.data.params  # where a run is recorded is not one of its parameters
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    assert [metric.step for metric in client.get_metric_history(mlflow_run.info.run_id, "step/loss")] == steps
    history = client.get_metric_history(mlflow_run.info.run_id, "epoch/val_mean_recall")
    assert [(metric.step, metric.value) for metric in history] == [(4, pytest.approx(val[0])), (8, pytest.approx(val[1]))]
    artefacts = {item.path for item in client.list_artifacts(mlflow_run.info.run_id)}
    assert artefacts == {"config.toml", "metrics.jsonl", "best.json", "training.png"}

    wandb = wandb_run(run)
    assert wandb["run"].display_name == "run" and wandb["run"].project == "vlmcache"
    logged = [row for row in wandb["history"] if "step/loss" in row]
    assert [row["_step"] for row in logged] == steps
    assert [row["epoch/val_mean_recall"] for row in wandb["history"] if "epoch/val_mean_recall" in row] == pytest.approx(val)
    assert {"projector", "lr", "fingerprint"} <= wandb["config"]
    assert {"config.toml", "metrics.jsonl", "best.json", "training.png"} <= wandb["files"]
    assert json.loads((run / "tracking.json").read_text()).keys() == {"tensorboard", "mlflow", "wandb"}


def interrupted_then_resumed(cache, run: Path, first: TrainConfig, then: TrainConfig) -> None:
    """Train `first`, killed after its first epoch, then resume it as `then`."""
    def interrupt(record: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        workflows.train(cache, run, first, on_epoch=interrupt)
    workflows.train(cache, run, then, resume=True)


def test_a_resumed_run_continues_its_mlflow_run_and_may_start_logging(cache, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    config = TrainConfig(projector="linear", epochs=2, batch_size=16, log="mlflow")
    interrupted_then_resumed(cache, tmp_path / "run", config, TrainConfig(**{**config.to_dict(), "log": "mlflow,tensorboard"}))
    [mlflow_run] = mlflow_runs(tmp_path / "run" / "mlruns", "vlmcache")
    assert mlflow_run.info.status == "FINISHED"  # FAILED when killed, then continued
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").resolve().as_uri())
    assert [metric.step for metric in client.get_metric_history(mlflow_run.info.run_id, "step/loss")] == list(range(1, 9))
    # TensorBoard started with the resumed epoch: its steps continue the run's count.
    assert [step for step, _ in scalars(tmp_path / "run" / "tensorboard")["step/loss"]] == [5, 6, 7, 8]
    # A run started without --log resumes with it (the tracking options are not part of what must match).
    config = TrainConfig(projector="linear", epochs=2, batch_size=16)
    interrupted_then_resumed(cache, tmp_path / "plain", config, TrainConfig(**{**config.to_dict(), "log": "tensorboard"}))
    assert [step for step, _ in scalars(tmp_path / "plain" / "tensorboard")["epoch/train_loss"]] == [8]


def test_caption_train_records_through_the_same_loop(cache, tmp_path):
    pytest.importorskip("tensorboard")
    config = CaptionConfig(epochs=1, batch_size=32, width=16, layers=1, heads=2, min_count=1, max_length=4,
                           log="tensorboard")
    workflows.train_captioner(cache, tmp_path / "caption", config)
    curves = scalars(tmp_path / "caption" / "tensorboard")
    assert len(curves["step/loss"]) == 4 and "epoch/val_cider" in curves and "best/cider" in curves
    assert "files/training.png" in tensorboard_tags(tmp_path / "caption" / "tensorboard")["images"]


def test_ablate_records_one_run_per_cell_grouped_under_the_grid(cache, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    out = tmp_path / "grid"
    args = ["ablate", cache, "--out", out, "--projectors", "linear", "--losses", "infonce", "--seeds", "0,1",
            "--epochs", "1", "--batch-size", "16", "--jobs", "1", "--no-baselines", "--log", "mlflow,tensorboard,wandb"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    runs = mlflow_runs(out / "mlruns", "grid")
    names = sorted(run.info.run_name for run in runs)
    assert len(names) == 3 and names[2] == "grid"
    assert names[0].startswith("cache linear infonce d256 s0 ") and names[1].startswith("cache linear infonce d256 s1 ")
    assert {run.data.tags["vlmcache.grid"] for run in runs} == {"grid"}
    [grid] = [run for run in runs if run.info.run_name == "grid"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    assert {item.path for item in client.list_artifacts(grid.info.run_id)} == {"ablation.json", "ablation.csv",
                                                                               "ablation.png"}
    assert grid.data.params["seeds"] == "(0, 1)"
    cells = sorted(path.name for path in (out / "tensorboard").iterdir())
    assert len(cells) == 3 and "grid" in cells
    assert all("step/loss" in scalars(out / "tensorboard" / name) for name in cells if name != "grid")
    groups = {record.run.run_group for record in map(wandb_record_of_run, (out / "wandb").glob("offline-run-*"))}
    assert groups == {"grid"}
    # Where cells are recorded is not part of what they compute: a rerun without --log reuses both cells.
    code, out_text, _ = run_cli(args[:-2], capsys)
    assert code == 0 and "0 runs trained, 2 reused" in out_text
    config = TrainConfig(projector="linear").to_dict()
    assert Cell(str(cache), config).key() == Cell(str(cache), {**config, "log": "mlflow", "log_uri": "x"}).key()


def wandb_record_of_run(folder: Path):
    """The run record of one W&B offline run folder."""
    [run_file] = folder.glob("run-*.wandb")
    return next(record for record in wandb_records(run_file) if record.WhichOneof("record_type") == "run")


def test_bad_tracking_input_is_one_line_before_any_training(cache, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["train", cache, "--out", tmp_path / "a", "--log", "neptune"], capsys)
    assert code == 2 and "--log neptune: unknown tracker 'neptune'; use any of tensorboard, mlflow, wandb" in err
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    for command in (["train", cache], ["caption", "train", cache], ["ablate", cache, "--no-baselines"]):
        code, _, err = run_cli([*command, "--out", tmp_path / "b", "--log", "tensorboard,mlflow"], capsys)
        assert code == 2 and err.strip() == "error: --log mlflow: pip install 'vlmcache[mlflow]'", err
    assert not (tmp_path / "b").exists()  # refused before a run folder was made
    monkeypatch.delitem(sys.modules, "mlflow")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(["train", cache, "--out", tmp_path / "c", "--log", "mlflow", "--log-uri", blocker / "mlruns"],
                           capsys)
    assert code == 2 and f"--log-uri {blocker / 'mlruns'}: cannot write there" in err and len(err.strip().splitlines()) == 1
    for uri in ("http://[::1", "bad\x00path", str(blocker)):
        with pytest.raises(VlmcacheError, match="--log-uri .*: cannot write there"):
            check_tracking("mlflow", uri)
    check_tracking("tensorboard", "http://[::1")  # only MLflow reads the URI
    with pytest.raises(VlmcacheError, match="unknown tracker .wandb;mlflow."):
        TrainConfig(log="wandb;mlflow")
    assert TrainConfig(log=" MLflow, tensorboard,mlflow").log == "mlflow,tensorboard"


def test_no_tracker_library_is_imported_unless_asked():
    script = ("import sys, vlmcache.app.cli, vlmcache.app.workflows, vlmcache.run.epochs, vlmcache.align.ablate; "
              "print(sorted(m for m in ('mlflow', 'wandb', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1])
    assert found.stdout.strip() == "[]"
