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
    from pipeline.preprocess.stage import run_preprocess

    require_dataset(cfg, "preprocess", "ingest")
    report = run_preprocess(cfg, force=force)
    _record_config(cfg, cfg.stage_dir("preprocess"))
    return report


def train(cfg: Config, force: bool = False, resume: bool = False) -> dict:
    from pipeline.train.stage import run_train

    require_dataset(cfg, "train", "preprocess")
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
    return result


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
