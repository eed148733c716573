"""The predict batch behind ``ctseg pull`` and ``ctseg listen``: model loaded once, series fed one at a time.

It is an ordinary predict batch on the output folder: the same ledger (``ledger.sqlite``, or its shared layout), the
same per-case outputs and the same ``report.json`` / ``.csv`` / ``.html``, rewritten after each
series, and the same exit code rule (3 when a case failed). A series folder that holds no series
the ingest selection rules keep (an MR, a localizer) is skipped with the rules' reason, not failed.
After each case the node sends its DICOM results to ``predict.send_to`` (a send failure is
recorded by :mod:`pipeline.pacs.send` and leaves the case done).

(Built on predict's ``_Batch`` and ``_report``: the lead may want to make them public.)
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from pipeline import atomic
from pipeline.config import Config
from pipeline.errors import InputError

log = logging.getLogger("ctseg.pacs")


def node_config(cfg: Config) -> tuple[Config, list[str]]:
    """The config a node segments with: DICOM SEG output on (results go back to the PACS as DICOM)."""
    notes = []
    if not cfg.predict.outputs.dicom_seg:
        outputs = dataclasses.replace(cfg.predict.outputs, dicom_seg=True)
        cfg = dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, outputs=outputs))
        notes.append("predict.outputs.dicom_seg was turned on: a DICOM node returns its results as DICOM")
    return cfg, notes


class NodeBatch:
    """One model, one ledger, one output folder; ``segment(folder)`` runs the cases of one received series."""

    def __init__(self, cfg: Config, model_dir: Path, output_dir: Path, retry_failed: bool = False):
        from pipeline.models.folder import MODEL_FILE, read_model_spec
        from pipeline.predict import cases as case_io
        from pipeline.predict.ledger import open_ledger, sha256_file
        from pipeline.predict.model import resolve_device
        from pipeline.predict.stage import _Batch, clean_partials, settings_hash

        self.cfg, self.notes = node_config(cfg)
        self.model_dir, self.output_dir = Path(model_dir), Path(output_dir)
        self.spec = read_model_spec(self.model_dir)  # a bad model folder stops the node before it accepts data
        self.retry_failed = retry_failed
        self.device = resolve_device(self.cfg.predict.device)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        options = self.cfg.predict
        self.ledger = open_ledger(self.output_dir, stale_minutes=options.stale_minutes, mode=options.ledger_mode,
                                  host=options.host_name, take_stale=options.take_stale)
        self.ledger.reset_abandoned()
        clean_partials(self.output_dir, self.ledger)
        self.run_hash = settings_hash(sha256_file(self.model_dir / MODEL_FILE), self.cfg)
        self.batch = _Batch(self.cfg, self.model_dir, self.output_dir, self.device, self.run_hash, self.ledger)
        self.discovery = case_io.Discovery(cases=[])
        self.outcomes: dict[str, str] = {}
        self.started = time.time()
        self.clock = time.perf_counter()
        self.sends: list[dict] = []

    def load(self) -> None:
        """Load the model now (once), so that a node fails before it accepts or retrieves anything."""
        if self.batch.predictor is None:
            self.batch._load()

    def segment(self, folder: Path, label: str, redo: bool = False) -> tuple[str, str | None, list[str]]:
        """Segment the series under ``folder``; (state done/failed/skipped, reason, case ids).

        ``redo``: the series changed since it was segmented (more instances arrived): its done cases are
        segmented again (and their new results sent)."""
        from pipeline.predict import cases as case_io
        from pipeline.predict import privacy

        hide = not self.cfg.predict.full_paths
        try:
            found = case_io.discover_cases(Path(folder), self.cfg.ingest, self.cfg.workers)
        except InputError as exc:
            skipped = f"series {label} skipped: {_selection_reason(exc)}"
            self.discovery.skipped.append(skipped)
            log.info("%s", skipped)
            return "skipped", skipped, []
        self.discovery.skipped.extend(found.skipped)
        known = {case.case_id for case in self.discovery.cases}
        self.discovery.cases.extend(case for case in found.cases if case.case_id not in known)
        sources = {case.case_id: privacy.public_source(case, hide) for case in found.cases}
        self.ledger.register([(case.case_id, sources[case.case_id]) for case in found.cases])
        states = []
        for case in found.cases:
            if redo and self.ledger.reopen(case.case_id):
                log.info("%s: series %s changed since it was segmented (more instances): segmenting it again",
                         case.case_id, label)
            outcome = self.batch.run_case(case, self.retry_failed, sources[case.case_id],
                                          privacy.case_redactor(case, Path(folder), hide))
            self.outcomes[case.case_id] = outcome
            states.append(self.ledger.get(case.case_id).status)
        ids = [case.case_id for case in found.cases]
        if self.cfg.predict.send_to:
            self.send(ids)
        self.write_report()
        if any(state == "failed" for state in states):
            errors = [self.ledger.get(i).error for i in ids if self.ledger.get(i).status == "failed"]
            return "failed", "; ".join(e for e in errors if e), ids
        return "done", None, ids

    def send(self, case_ids: list[str] | None) -> dict:
        """Send these cases' DICOM results (None: every done case's unsent ones) to predict.send_to."""
        from pipeline.pacs.send import send_results

        report = send_results(self.cfg.pacs, self.output_dir, self.cfg.predict.send_to, case_ids=case_ids)
        self.sends.extend(report["items"])
        return report

    def write_report(self, extra: dict | None = None) -> dict:
        from pipeline.predict import report as reporting
        from pipeline.predict.stage import _report, _RunInfo
        from pipeline.stage import REPORT_FILE

        rows = self.ledger.rows([case.case_id for case in self.discovery.cases])
        mine = {case.case_id for case in self.discovery.cases}
        seconds = time.perf_counter() - self.clock
        run = _RunInfo(cfg=self.cfg, spec=self.spec, model_dir=self.model_dir, output_dir=self.output_dir,
                       input_label="DICOM node spool (private/pacs-spool)", shard=None, device=self.device,
                       started=self.started, run_hash=self.run_hash)
        report = _report(run, self.batch, rows, mine_ids=mine, outcomes=self.outcomes,
                         skipped=list(self.discovery.skipped), seconds=seconds)
        from pipeline.pacs.send import read_sends

        report["ledger"] = self.ledger.describe()
        report["notes"] = list(self.notes)
        report["sends"] = read_sends(self.output_dir)
        if extra:
            report.update(extra)
        names = [label["name"] for label in self.spec.get("labels", [])] if self.batch.predictor is None else \
            [info.name for info in self.batch.predictor.labels]
        atomic.write_json(self.output_dir / REPORT_FILE, report)
        reporting.write_csv(self.output_dir / "report.csv", rows, names)
        summary = reporting.summary_block(rows, self.model_dir, str(self.device), seconds, self.discovery.skipped)
        reporting.write_html(self.output_dir / "report.html", self.output_dir, rows, summary, names)
        return report

    def close(self) -> None:
        self.ledger.close()
        self.batch.reserve.release()


def _selection_reason(exc: InputError) -> str:
    """The selection rules' reason from discovery's 'no series selected' error, without the folder path."""
    text = str(exc)
    if "none selected (" in text:
        return "not selected by the ingest rules: " + text.split("none selected (", 1)[1].rsplit(")", 1)[0]
    return text
