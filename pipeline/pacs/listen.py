"""``ctseg listen``: a C-STORE receiver that spools series atomically and segments each complete one.

The receiver (pynetdicom's threaded server) keeps accepting while the main thread segments: each
incoming instance goes to the spool (:mod:`pipeline.pacs.spool`); a series is complete when the
association that delivered it is released (``pacs.listen.complete_on: release``) or when it has
been quiet for ``pacs.listen.quiet_seconds`` (``quiet``). Complete series are segmented one at a
time by one :class:`~pipeline.pacs.batch.NodeBatch` (the model is loaded once, before the port
opens) and their results sent to ``predict.send_to``.

Security: it listens on ``pacs.listen.host`` (127.0.0.1 by default), accepts only calling AE
titles of ``pacs.listen.allowed_calling_aes`` (refusing to start with an empty list), answers
only its own called AE title, and can require TLS. Logs name series by their spool key (a hash),
never by patient data.

Stopping: SIGTERM or Ctrl-C stops accepting; the case being segmented finishes (SIGTERM) or is
handed back (Ctrl-C). After a kill -9 a restart resumes: half-received series wait for a resend
(reported in ``report.json`` under ``listen``), complete ones are segmented.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

from pipeline import atomic
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.pacs.network import STORAGE_CLASSES, check_ae_title, make_ae, require_pynetdicom, server_tls
from pipeline.pacs.spool import Spool

log = logging.getLogger("ctseg.pacs")

SPOOL_FOLDER = Path("private") / "pacs-spool"
STATUS_FILE = "listen.json"
POLL_SECONDS = 0.25


def spool_root(output_dir: Path) -> Path:
    """Received DICOM (with its patient data) lives under ``<OUT>/private/``, like every PHI-bearing file."""
    return Path(output_dir) / SPOOL_FOLDER


def store_handler(spool: Spool, association_of=None):
    """An EVT_C_STORE handler that writes each instance into ``spool`` atomically; returns the DIMSE status."""

    def handle(event):
        try:
            ds = event.dataset
            study, series, sop = (str(getattr(ds, k, "") or "") for k in
                                  ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
            if not (study and series and sop):
                log.warning("listen: an instance without Study/Series/SOP Instance UID was refused")
                return 0xA900  # dataset does not match SOP class
            modality = str(getattr(ds, "Modality", "") or "")
            key = association_of(event) if association_of else f"assoc-{id(event.assoc)}"
            spool.store(event.encoded_dataset(include_meta=True), study, series, sop, modality, key)
        except OSError as exc:
            log.error("listen: cannot write a received instance to the spool: %s", type(exc).__name__)
            return 0xA700  # out of resources
        except Exception as exc:  # an undecodable dataset is refused, the association goes on
            log.error("listen: a received instance could not be stored: %s", type(exc).__name__)
            return 0xC000
        return 0x0000

    return handle


def _association_key(event) -> str:
    return f"assoc-{id(event.assoc)}"


def start_receiver(cfg: Config, spool: Spool, host: str, port: int, allowed: list[str], complete_on: str = "release"):
    """Start the storage SCP (non-blocking) and return the server; refuses callers not in ``allowed``.

    ``complete_on``: release completes a series when its association is released; quiet leaves that to
    :meth:`Spool.check_quiet`."""
    require_pynetdicom()
    from pynetdicom import ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import Verification

    if not allowed:
        raise ConfigError("pacs.listen.allowed_calling_aes must list the AE titles allowed to send (the PACS, the "
                          "scanners), got an empty list. Add them, e.g. "
                          "--set 'pacs.listen.allowed_calling_aes=[PACS]'.")
    for title in allowed:
        check_ae_title(title, "each entry of pacs.listen.allowed_calling_aes")
    ae = make_ae(cfg.pacs)
    ae.require_calling_aet = list(allowed)
    ae.require_called_aet = True
    ae.maximum_associations = max(1, cfg.pacs.listen.max_associations)
    for uid in STORAGE_CLASSES:
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)

    def ended(released: bool):
        def handler(event):
            completed = spool.association_ended(_association_key(event), released, complete_on)
            if completed:
                log.info("listen: %d series complete (association released)", len(completed))
        return handler

    def rejected(event):
        requestor = event.assoc.requestor
        log.warning("listen: association from %s calling AE title %r refused (not on pacs.listen.allowed_calling_aes,"
                    " or a called AE title other than %r)", requestor.address, requestor.ae_title, cfg.pacs.ae_title)

    def closed(event):
        spool.connection_closed(_association_key(event))

    # EVT_CONN_CLOSE can come before EVT_RELEASED (the DUL thread sees the peer close the socket right after
    # our release answer, while the association thread has yet to report the release): it must not count
    # as an abort at once
    handlers = [(evt.EVT_C_STORE, store_handler(spool, _association_key)), (evt.EVT_RELEASED, ended(True)),
                (evt.EVT_ABORTED, ended(False)), (evt.EVT_CONN_CLOSE, closed), (evt.EVT_REJECTED, rejected)]
    try:
        return ae.start_server((host, port), block=False, evt_handlers=handlers, ssl_context=server_tls(cfg.pacs))
    except OSError as exc:
        raise ConfigError(f"pacs.listen.port {port} on {host} must be free to listen on, got {exc}. Choose another "
                          f"port or stop the program using it.") from None


def run_listen(cfg: Config, model_dir: Path, output_dir: Path, stop: threading.Event | None = None,
               max_seconds: float | None = None) -> dict:
    """Receive and segment until stopped (SIGTERM, Ctrl-C, ``stop`` set, or ``max_seconds``); returns the report."""
    from pipeline.pacs.batch import NodeBatch

    listen = cfg.pacs.listen
    check_ae_title(cfg.pacs.ae_title, "pacs.ae_title")
    if not listen.allowed_calling_aes:
        start_receiver(cfg, None, listen.host, listen.port, [])  # raises the allow-list error
    output_dir = Path(output_dir)
    stop = stop or threading.Event()
    # a series received again after its case failed is tried again: the sender's resend is the request
    batch = NodeBatch(cfg, model_dir, output_dir, retry_failed=True)
    spool = Spool(spool_root(output_dir))
    server = None
    previous = None
    try:
        pruned = spool.prune(cfg.pacs.spool_retention_days)
        if pruned:
            log.info("listen: removed the received images of %d series segmented more than %g days ago", pruned,
                     cfg.pacs.spool_retention_days)
        recovered = spool.recover()
        if recovered["incomplete"]:
            log.warning("listen: %d series were half received when the receiver stopped; they wait for a resend",
                        recovered["incomplete"])
        batch.load()
        if batch.cfg.predict.send_to:  # sends that failed before the restart (destination down) are retried
            batch.send(None)
        server = start_receiver(batch.cfg, spool, listen.host, listen.port, listen.allowed_calling_aes,
                                listen.complete_on)
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        log.info("listen: %s accepting on %s:%d", cfg.pacs.ae_title, listen.host, listen.port)
        _write_status(output_dir, spool, "listening")
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            changed = spool.check_quiet(listen.quiet_seconds, listen.complete_on)
            job = spool.take_complete()
            if job is None:
                if changed:
                    _write_status(output_dir, spool, "listening")
                stop.wait(POLL_SECONDS)
                continue
            key, instances = job
            before = spool.get(key)["segmented_instances"]
            _write_status(output_dir, spool, "segmenting")
            try:
                state, reason, cases = batch.segment(spool.folder(key), key,
                                                     redo=before is not None and before != instances)
            except Exception as exc:  # the node keeps running; the series is reported failed
                state, reason, cases = "failed", f"series {key}: unexpected {type(exc).__name__}: {exc}", []
                log.error("listen: %s", reason)
            if not spool.finish(key, state, reason, cases, instances):
                log.info("listen: series %s received more instances while it was segmented; it is segmented "
                         "again once complete", key)
            log.info("listen: series %s %s", key, state)
            _write_status(output_dir, spool, "listening")
    finally:
        if server is not None:
            server.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        report = batch.write_report({"listen": listen_summary(spool)})
        _write_status(output_dir, spool, "stopped")
        spool.close()
        batch.close()
    return report


def listen_summary(spool: Spool) -> dict:
    rows = spool.rows()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {"counts": counts, "series": [{"series": r["key"], "modality": r["modality"], "instances": r["instances"],
                                          "state": r["state"], "reason": r["reason"],
                                          "cases": json.loads(r["cases"]) if r["cases"] else []} for r in rows]}


def _write_status(output_dir: Path, spool: Spool, state: str) -> None:
    summary = listen_summary(spool)
    summary.update(state=state, updated=time.time())
    atomic.write_json(Path(output_dir) / STATUS_FILE, summary)
