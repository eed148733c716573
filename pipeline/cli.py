"""The ``ctseg`` command line: argument parsing over :mod:`pipeline.api`, and nothing else.

Exit codes: 0 ok; 1 runtime error; 2 bad arguments or configuration; 3 (ingest, predict, run) some
cases failed and the others finished.
Errors print one line naming the file or case and the fix; ``--debug`` adds the traceback.
Torch and MONAI are imported only inside the verbs, so ``ctseg --help`` answers at once.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline import __version__

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

DESCRIPTION = """CT segmentation pipeline: ingest -> preprocess -> train -> predict -> evaluate.

  ctseg demo                                   synthetic end-to-end run on this machine
  ctseg ingest EXPORT --output DIR             DICOM/NIfTI export -> HU NIfTI + labels
  ctseg run -c configs/my.yaml                 every stage of an experiment, in order
  ctseg predict --model M --input PATH --output OUT
  ctseg evaluate --pred DIR --ref DIR --output OUT
  ctseg pull --since 24h --model M --output OUT   query the PACS, retrieve, segment, send back
  ctseg listen --model M --output OUT          C-STORE receiver that segments what arrives
  ctseg send --output OUT --to planning        send finished cases' SEG/RTSTRUCT (retries failed sends)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints usage; one line is kinder in batch logs
        self.exit(EXIT_USAGE, f"ctseg: error: {message}. See 'ctseg {self.prog.split()[-1]} --help'.\n"
                  if " " in self.prog else f"ctseg: error: {message}. See 'ctseg --help'.\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                        help="YAML file of setting overrides (repeatable; later files win)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one setting, e.g. --set train.max_steps=200 (repeatable)")
    common.add_argument("--experiment", help="experiment name (outputs/<experiment>/...)")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")

    parser = _Parser(prog="ctseg", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ctseg {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_Parser)

    p = verbs.add_parser("ingest", parents=[common], help="read a DICOM/NIfTI export into HU NIfTI volumes")
    p.add_argument("source", nargs="?", type=Path, help="export folder or file (default: the dataset's source)")
    p.add_argument("--output", type=Path, help="output folder (default: outputs/<experiment>/ingest)")
    p.add_argument("--force", action="store_true", help="redo even if up to date")

    p = verbs.add_parser("preprocess", parents=[common], help="plan, resample and cache training arrays")
    p.add_argument("--force", action="store_true", help="redo even if up to date")

    p = verbs.add_parser("train", parents=[common], help="train the network; writes a model folder")
    p.add_argument("--force", action="store_true", help="retrain from scratch even if up to date")
    p.add_argument("--resume", action="store_true", help="continue exactly where training stopped")

    p = verbs.add_parser("predict", parents=[common], help="segment a batch of volumes (resumable)")
    p.add_argument("--model", type=Path, help="trained model folder (default: outputs/<experiment>/train/model)")
    p.add_argument("--input", type=Path, help="DICOM export, folder of NIfTI/NRRD/MHA, a file, or a .txt list")
    p.add_argument("--output", type=Path, help="output folder (default: outputs/<experiment>/predict)")
    p.add_argument("--shard", help="i/n: process only shard i of n (0-based) of the sorted cases; 'slurm': take i "
                                   "and n from a SLURM job array (SLURM_ARRAY_TASK_ID/_MIN/_COUNT)")
    p.add_argument("--retry-failed", action="store_true", help="retry cases that failed in an earlier run")
    p.add_argument("--take-stale", action="store_true",
                   help="take over cases claimed by another host whose heartbeat stopped (a node that died)")
    p.add_argument("--report-only", type=Path, metavar="OUT",
                   help="rewrite the merged report of the batch folder OUT from its ledgers, and do nothing else")

    p = verbs.add_parser("pull", parents=[common], help="query the PACS, retrieve new series and segment them")
    p.add_argument("--query", nargs="+", default=[], metavar="KEY=VALUE",
                   help="C-FIND attributes, e.g. StudyDate=20261130 Modality=CT")
    p.add_argument("--since", help="studies of the last 24h, 90m, 2d, ...")
    p.add_argument("--model", type=Path, help="trained model folder (default: outputs/<experiment>/train/model)")
    p.add_argument("--output", type=Path, help="output folder (default: outputs/<experiment>/predict)")
    p.add_argument("--retry-failed", action="store_true", help="retrieve and segment again series that failed")

    p = verbs.add_parser("listen", parents=[common], help="receive series by C-STORE and segment them")
    p.add_argument("--model", type=Path, help="trained model folder (default: outputs/<experiment>/train/model)")
    p.add_argument("--output", type=Path, help="output folder (default: outputs/<experiment>/predict)")
    p.add_argument("--max-seconds", type=float, help="stop after this long (default: run until SIGTERM/Ctrl-C)")

    p = verbs.add_parser("send", parents=[common], help="send finished cases' DICOM results to a peer")
    p.add_argument("--output", type=Path, help="predict folder (default: outputs/<experiment>/predict)")
    p.add_argument("--to", nargs="+", metavar="PEER", help="peer names of pacs.peers (default: predict.send_to)")
    p.add_argument("--resend", action="store_true", help="send again what was already sent")

    p = verbs.add_parser("evaluate", parents=[common], help="Dice, HD95, surface Dice, volumes per case")
    p.add_argument("--pred", type=Path, help="predicted label volumes (folder)")
    p.add_argument("--ref", type=Path, help="reference label volumes (folder)")
    p.add_argument("--output", type=Path, help="output folder (default: outputs/<experiment>/evaluate)")
    p.add_argument("--resample-ref", action="store_true", help="resample references onto the prediction grid")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"),
                   help="compare two evaluation folders with a paired Wilcoxon test")

    p = verbs.add_parser("run", parents=[common], help="all stages in order for one experiment")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--retry-failed", action="store_true", help="predict again held-out cases that failed earlier")

    p = verbs.add_parser("demo", parents=[common], help="generate phantoms and run every stage on them")
    p.add_argument("--cases", type=int, help="number of phantoms (default from configs/demo.yaml)")
    p.add_argument("--output", type=Path, help="the demo's experiment folder (default: outputs/demo)")

    p = verbs.add_parser("config", parents=[common], help="print the resolved configuration")
    p.add_argument("--reference", action="store_true", help="list every setting with its default and help")
    return parser


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    from pipeline.errors import ConfigError

    if not text:
        return None
    if text == "slurm":
        from pipeline.predict.cases import slurm_shard

        return slurm_shard()
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got '{text}'.") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard i/n must have 0 <= i < n, got '{text}'.")
    return index, count


def _load(args):
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if args.experiment:
        overrides.append(f"experiment={args.experiment}")
    if getattr(args, "resample_ref", False):
        overrides.append("evaluate.resample_ref=true")
    if getattr(args, "take_stale", False):
        overrides.append("predict.take_stale=true")
    files = list(args.config)
    if args.verb == "demo" and not files:
        files = [_demo_config()]
    if args.verb == "demo" and args.output is not None:  # the folder holds the whole demo experiment
        folder = args.output.resolve()
        overrides += [f"output_root={folder.parent}", f"experiment={folder.name}"]
    return load_config(files, overrides)


def _demo_config() -> Path:
    from pipeline.demo import demo_config_path

    return demo_config_path()


def dispatch(args) -> int:
    from pipeline import api

    cfg = _load(args)
    verb = args.verb
    if cfg.train.deterministic and verb in ("train", "run", "demo"):
        # cuBLAS reads this when CUDA starts, which is later in this process: set it now, before torch does
        from pipeline.devices import request_deterministic_cublas

        request_deterministic_cublas()
    if verb == "config":
        from pipeline.config import reference, to_yaml

        if args.reference:
            for key, kind, default, help_text in reference():
                print(f"{key} ({kind}, default {default!r}): {help_text}")
        else:
            print(to_yaml(cfg), end="")
        return EXIT_OK
    if verb == "ingest":
        report = api.ingest(cfg, source=args.source, output=args.output, force=args.force)
    elif verb == "preprocess":
        report = api.preprocess(cfg, force=args.force)
    elif verb == "train":
        report = api.train(cfg, force=args.force, resume=args.resume)
    elif verb == "predict" and args.report_only:
        report = api.predict_report(args.report_only)
    elif verb == "predict":
        result = api.predict(cfg, model_dir=args.model, input_path=args.input, output=args.output,
                             shard=_parse_shard(args.shard), retry_failed=args.retry_failed)
        _summarise(result.report)
        return result.exit_code
    elif verb == "pull":
        result = api.pull(cfg, args.query, since=args.since, model_dir=args.model, output=args.output,
                          retry_failed=args.retry_failed)
        _summarise(result.report)
        return result.exit_code
    elif verb == "listen":
        report = api.listen(cfg, model_dir=args.model, output=args.output, max_seconds=args.max_seconds)
        _summarise(report)
        return EXIT_OK
    elif verb == "send":
        report = api.send(cfg, output=args.output, to=args.to, resend=args.resend)
        print(f"ctseg send: {report['sent']} sent, {report['already_sent']} already sent, {report['failed']} failed; "
              f"report: {Path(report['folder']) / 'send-report.json'}")
        return EXIT_PARTIAL if report["status"] != "ok" else EXIT_OK
    elif verb == "evaluate":
        if args.compare:
            report = api.compare(cfg, args.compare[0], args.compare[1], output=args.output)
            print((Path(report["folder"]) / "comparison.txt").read_text(), end="")
        else:
            report = api.evaluate(cfg, pred_dir=args.pred, ref_dir=args.ref, output=args.output)
            print(report.get("table", ""))
    elif verb == "run":
        reports = api.run(cfg, force=args.force, retry_failed=args.retry_failed)
        partial = any(reports[stage].get("status") == "failed" for stage in ("ingest", "predict"))
        return EXIT_PARTIAL if partial else EXIT_OK
    elif verb == "demo":
        report = api.demo(cfg, cases=args.cases)
        return EXIT_OK if report.get("passed", True) else EXIT_RUNTIME
    else:  # pragma: no cover - argparse rejects unknown verbs
        return EXIT_USAGE
    _summarise(report)
    # ingest with some failed cases completed the others (each failure is in report.json): exit 3 as predict
    return EXIT_PARTIAL if report.get("status") == "failed" and verb in ("predict", "ingest") else (
        EXIT_RUNTIME if report.get("status") == "failed" else EXIT_OK)


def _summarise(report: dict) -> None:
    counts = report.get("counts")
    if counts:
        print(f"ctseg {report.get('stage', '')}: {counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed, "
              f"{counts.get('resumed', 0)} already done; report: {Path(report.get('folder', '.')) / 'report.json'}")
    elif report.get("status") == "up_to_date":
        print(f"ctseg {report.get('stage')}: up to date ({report.get('folder')}), nothing to do")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return EXIT_USAGE
    # libraries (highdicom, MONAI, ...) only speak up for warnings unless --debug: their info lines are
    # noise in an overnight log and can carry study UIDs
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="ctseg: %(message)s", stream=sys.stderr)
    logging.getLogger("ctseg").setLevel(logging.DEBUG if args.debug else logging.INFO)
    # library UserWarnings (pydicom and highdicom quote header values such as names and dates when they
    # complain about a source's format) go through logging and are shown only with --debug; ctseg's own
    # checks report problems with the file and what to do
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if args.debug else logging.ERROR)
    from pipeline.errors import CtsegError

    try:
        return dispatch(args)
    except CtsegError as exc:
        if args.debug:
            raise
        print(f"ctseg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ctseg: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as exc:  # an unexpected failure still gets one line, unless --debug
        if args.debug:
            raise
        print(f"ctseg: error: {type(exc).__name__}: {exc}. Rerun with --debug for the traceback.", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
