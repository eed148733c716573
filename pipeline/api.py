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

log = logging.getLogger("ctseg")


def _record_config(cfg: Config, folder: Path) -> None:
    """Every run folder gets the fully resolved config it ran with."""
    atomic.write_text(Path(folder) / "config.yaml", to_yaml(cfg))


def ingest(cfg: Config, source: Path | None = None, output: Path | None = None, force: bool = False) -> dict:
    from pipeline.ingest.stage import run_ingest

    report = run_ingest(cfg, source=source, output=output, force=force)
    _record_config(cfg, Path(report["folder"]))
    return report


def preprocess(cfg: Config, force: bool = False) -> dict:
    from pipeline.preprocess.stage import run_preprocess

    report = run_preprocess(cfg, force=force)
    _record_config(cfg, cfg.stage_dir("preprocess"))
    return report


def train(cfg: Config, force: bool = False, resume: bool = False) -> dict:
    from pipeline.train.stage import run_train

    report = run_train(cfg, force=force, resume=resume)
    _record_config(cfg, cfg.stage_dir("train"))
    return report


def default_model_dir(cfg: Config) -> Path:
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
    from pipeline.evaluate.stage import run_evaluate

    pred_dir = Path(pred_dir) if pred_dir else cfg.stage_dir("predict")
    ref_dir = Path(ref_dir) if ref_dir else cfg.stage_dir("ingest") / "labelsTs"
    output = Path(output) if output else cfg.stage_dir("evaluate")
    report = run_evaluate(cfg, pred_dir, ref_dir, output)
    _record_config(cfg, output)
    return report


def compare(cfg: Config, run_a: Path, run_b: Path, output: Path | None = None) -> dict:
    from pipeline.evaluate.stage import run_compare

    return run_compare(cfg, Path(run_a), Path(run_b), Path(output) if output else None)


def run(cfg: Config, force: bool = False, retry_failed: bool = False) -> dict:
    """All stages in order: ingest → preprocess → train → predict (held-out cases) → evaluate.

    ``retry_failed``: predict again the held-out cases that failed in an earlier run.
    """
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
    from pipeline.demo import run_demo

    return run_demo(cfg, cases=cases)
