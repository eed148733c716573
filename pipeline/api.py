"""The Python API: one function per CLI verb, each taking a resolved :class:`~pipeline.config.Config`.

    from pipeline import api
    from pipeline.config import load_config
    cfg = load_config(["configs/demo.yaml"], ["train.max_steps=50"])
    api.run(cfg)

Stages default to the experiment's folders (``<output_root>/<experiment>/<stage>``); the explicit
path arguments let a stage run on folders of the user's choice (as ``ctseg predict --input``).
Each function returns the stage's report (the dict written to its ``report.json``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline import atomic
from pipeline.config import Config, to_yaml
from pipeline.errors import ConfigError

log = logging.getLogger("ctseg")


def _torchrun_rank_and_world() -> tuple[int, int]:
    from pipeline.torchrun import torchrun_env  # torch-free: ingest must not import torch

    return torchrun_env()[:2]


def _record_config(cfg: Config, folder: Path) -> None:
    """Every run folder gets the fully resolved config it ran with (under torchrun, written by rank 0 only)."""
    if _torchrun_rank_and_world()[0] != 0:
        return
    atomic.write_text(Path(folder) / "config.yaml", to_yaml(cfg))


def ingest(cfg: Config, source: Path | None = None, output: Path | None = None, force: bool = False) -> dict:
    """Scan an export (or the dataset's cases) and write HU volumes and label maps with the source geometry.

    ``source``: a DICOM export or folder of volumes to read instead of the config's ``dataset``; ``output``: the
    folder to write (default ``<experiment>/ingest``); ``force``: redo every case. Returns the stage report.
    """
    from pipeline.ingest.stage import run_ingest

    report = run_ingest(cfg, source=source, output=output, force=force)
    _record_config(cfg, Path(report["folder"]))
    return report


def require_dataset(cfg: Config, stage: str, upstream: str) -> None:
    """Say first that no dataset is configured, before sending the user back through the upstream stages."""
    from pipeline.errors import ConfigError
    from pipeline.stage import read_done

    if cfg.dataset or read_done(cfg.stage_dir(upstream)) is not None:
        return
    raise ConfigError(f"{stage} needs a dataset with labels, but no dataset is configured (and experiment "
                      f"'{cfg.experiment}' has no finished {upstream} stage in {cfg.stage_dir(upstream)}). Pass "
                      f"-c configs/<name>.yaml or --set dataset=datasets/<name>/dataset.yaml; for an export without "
                      f"a description, 'ctseg ingest EXPORT --output DIR' writes DIR/dataset.suggested.yaml to "
                      f"start from. Then run 'ctseg run' (ingest, preprocess, train).")


def preprocess(cfg: Config, force: bool = False) -> dict:
    """Fingerprint and plan the ingested training set, then resample, window and cache every case.

    Reads ``<experiment>/ingest``, writes ``<experiment>/preprocess``; ``force`` recomputes cached arrays too.
    """
    from pipeline.preprocess.stage import run_preprocess

    require_dataset(cfg, "preprocess", "ingest")
    report = run_preprocess(cfg, force=force)
    _record_config(cfg, cfg.stage_dir("preprocess"))
    return report


def train(cfg: Config, force: bool = False, resume: bool = False) -> dict:
    """Train every configured fold on the preprocessed cache and write ``<experiment>/train/model``.

    ``resume``: continue from the last checkpoint of each unfinished fold; ``force``: retrain from scratch.
    """
    from pipeline.train.stage import run_train

    require_dataset(cfg, "train", "preprocess")
    report = run_train(cfg, force=force, resume=resume)
    _record_config(cfg, cfg.stage_dir("train"))
    return report


def default_model_dir(cfg: Config) -> Path:
    """The model folder the train stage of ``cfg``'s experiment writes."""
    return cfg.stage_dir("train") / "model"


def predict(cfg: Config, model_dir: Path | None = None, input_path: Path | None = None,
            output: Path | None = None, shard: tuple[int, int] | None = None, retry_failed: bool = False):
    """Batch prediction; returns a result with ``.report`` and ``.exit_code`` (0 ok, 3 some cases failed)."""
    from pipeline.predict.stage import run_predict

    model_dir = Path(model_dir) if model_dir else default_model_dir(cfg)
    input_path = Path(input_path) if input_path else cfg.stage_dir("ingest") / "imagesTs"
    output = Path(output) if output else cfg.stage_dir("predict")
    result = run_predict(cfg, model_dir, input_path, output, shard=shard, retry_failed=retry_failed)
    _record_config(cfg, output)
    if cfg.predict.send_to:  # a destination that is down fails the sends (exit 3), never the segmentation
        sent = send(cfg, output)
        result.report["send"] = sent
        if sent["status"] != "ok" and result.exit_code == 0:
            result.exit_code = 3
    return result


def predict_report(output: Path) -> dict:
    """Rewrite the merged report (json, csv, html) of the batch folder ``output`` from all of its ledgers."""
    from pipeline.predict.stage import rewrite_report

    return rewrite_report(Path(output))


def send(cfg: Config, output: Path | None = None, to: list[str] | None = None, resend: bool = False) -> dict:
    """Send the DICOM results (SEG, RTSTRUCT) of a predict folder's done cases to ``to`` (default predict.send_to)."""
    from pipeline.pacs.send import send_results

    output = Path(output) if output else cfg.stage_dir("predict")
    report = send_results(cfg.pacs, output, list(to or cfg.predict.send_to), resend=resend)
    atomic.write_json(output / "send-report.json", report)
    return report


def pull(cfg: Config, query: list[str], since: str | None = None, model_dir: Path | None = None,
         output: Path | None = None, retry_failed: bool = False):
    """Query the PACS (pacs.source), retrieve new series and segment them; ``.report`` and ``.exit_code``."""
    from pipeline.pacs.pull import run_pull

    model_dir = Path(model_dir) if model_dir else default_model_dir(cfg)
    output = Path(output) if output else cfg.stage_dir("predict")
    result = run_pull(cfg, model_dir, output, list(query), since=since, retry_failed=retry_failed)
    _record_config(cfg, output)
    return result


def listen(cfg: Config, model_dir: Path | None = None, output: Path | None = None,
           max_seconds: float | None = None) -> dict:
    """Run the C-STORE receiver and segment what arrives until stopped; returns the report."""
    from pipeline.pacs.listen import run_listen

    model_dir = Path(model_dir) if model_dir else default_model_dir(cfg)
    output = Path(output) if output else cfg.stage_dir("predict")
    _record_config(cfg, output)
    return run_listen(cfg, model_dir, output, max_seconds=max_seconds)


def evaluate(cfg: Config, pred_dir: Path | None = None, ref_dir: Path | None = None,
             output: Path | None = None) -> dict:
    """Score predictions against reference labels of the same case ids: metrics.csv, summary.json, HTML report.

    Defaults: ``<experiment>/predict`` against ``<experiment>/ingest/labelsTs``, into ``<experiment>/evaluate``.
    """
    from pipeline.evaluate.stage import run_evaluate

    pred_dir = Path(pred_dir) if pred_dir else cfg.stage_dir("predict")
    ref_dir = Path(ref_dir) if ref_dir else cfg.stage_dir("ingest") / "labelsTs"
    output = Path(output) if output else cfg.stage_dir("evaluate")
    report = run_evaluate(cfg, pred_dir, ref_dir, output)
    _record_config(cfg, output)
    return report


def compare(cfg: Config, run_a: Path, run_b: Path, output: Path | None = None) -> dict:
    """Paired per-class comparison (Wilcoxon, bootstrap CIs) of two evaluation folders; returns its report."""
    from pipeline.evaluate.stage import run_compare

    return run_compare(cfg, Path(run_a), Path(run_b), Path(output) if output else None)


def run(cfg: Config, force: bool = False, retry_failed: bool = False) -> dict:
    """All stages in order: ingest → preprocess → train → predict (held-out cases) → evaluate.

    ``retry_failed``: predict again the held-out cases that failed in an earlier run.

    Refused under torchrun: ingest, preprocess and evaluate run in one process, and holding the other
    ranks at a collective for them (hours on a large export) would need a timeout long enough to hide
    a real hang in training. Run the stages one by one instead; only train (and predict, as shards)
    use torchrun's processes.
    """
    _rank, world = _torchrun_rank_and_world()
    if world > 1:
        raise ConfigError(f"'ctseg run' must run as one process, got WORLD_SIZE={world} (started by torchrun). Run "
                          f"'ctseg ingest' and 'ctseg preprocess' once, then 'torchrun --nproc_per_node N -m pipeline "
                          f"train ...', then 'ctseg predict' and 'ctseg evaluate', each with the same -c/--set "
                          f"options.")
    reports = {"ingest": ingest(cfg, force=force)}
    reports["preprocess"] = preprocess(cfg, force=force)
    reports["train"] = train(cfg, force=force)
    result = predict(cfg, retry_failed=retry_failed)
    reports["predict"] = result.report
    if result.exit_code != 0:
        log.warning("predict: some cases failed; evaluating the ones that succeeded")
    reports["evaluate"] = evaluate(cfg)
    _record_config(cfg, cfg.experiment_dir)
    return reports


def demo(cfg: Config, cases: int | None = None) -> dict:
    """Write the synthetic phantom export, run every stage on it and score the held-out phantoms.

    ``cases``: the number of phantoms (default from the config's ``demo`` section). The result holds ``passed``,
    ``mean_foreground_dice``, ``minutes`` and each stage's report.
    """
    from pipeline.demo import run_demo

    return run_demo(cfg, cases=cases)
