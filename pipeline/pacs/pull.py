"""``ctseg pull``: query a PACS (C-FIND or QIDO-RS), retrieve the series to segment, and run the predict batch.

1. The query (``--query StudyDate=20261130 Modality=CT`` and/or ``--since 24h``) is split into a
   study-level and a series-level C-FIND (Study Root). Without a Modality in the query, the
   modalities of the ingest selection rules are asked for; series with fewer instances than the
   rules' ``min_slices`` are passed over without being retrieved.
2. A series already done in the output folder's ledger (by its Study and Series Instance UIDs, the
   basis of predict's case id) is skipped; one that failed is skipped unless ``--retry-failed``.
3. Each remaining series is retrieved into the spool (:mod:`pipeline.pacs.spool`) by C-GET, by
   C-MOVE to ctseg's own receiver, or by WADO-RS. A retrieval that ends with fewer instances than
   the PACS announced is reported and not segmented.
4. Each retrieved series is segmented by the node batch (:mod:`pipeline.pacs.batch`): same ledger,
   report and exit codes as ``ctseg predict`` (0 ok, 3 some series failed), and its results are
   sent to ``predict.send_to``.
"""
from __future__ import annotations

import datetime as _dt
import io
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from pipeline.config import Config
from pipeline.errors import ConfigError, CtsegError
from pipeline.pacs.network import (
    STORAGE_CLASSES,
    client_tls,
    describe_peer,
    describe_status,
    find_peer,
    make_ae,
    require_pynetdicom,
)
from pipeline.pacs.options import PeerOptions
from pipeline.pacs.spool import Spool, series_key

log = logging.getLogger("ctseg.pacs")

EXIT_OK, EXIT_SOME_FAILED = 0, 3
STUDY_KEYS = {"PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
              "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
              "StudyInstanceUID", "InstitutionName"}
RETRIEVE_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57",
                     "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"]
_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhd])\s*$")


@dataclass
class PullResult:
    report: dict
    exit_code: int


@dataclass
class SeriesHit:
    """One series the query found (UIDs stay in memory; reports show its spool key)."""

    study_uid: str
    series_uid: str
    modality: str
    instances: int | None
    study_datetime: _dt.datetime | None = None
    key: str = ""
    patient_id: str = ""     # only for predict's case id when ingest.anonymise_case_ids is false; never reported
    series_number: str = ""
    state: str = "found"
    reason: str | None = None
    cases: list = field(default_factory=list)

    def row(self) -> dict:
        return {"series": self.key, "modality": self.modality, "instances": self.instances, "state": self.state,
                "reason": self.reason, "cases": self.cases}


# ---------------------------------------------------------------------------------------------
# Query
# ---------------------------------------------------------------------------------------------

def parse_query(items: list[str], since: str | None, now: _dt.datetime | None = None
                ) -> tuple[dict[str, str], _dt.datetime | None]:
    """``KEY=VALUE`` items (DICOM keywords) and ``--since`` → (attributes, earliest study time)."""
    from pydicom.datadict import tag_for_keyword

    query: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--query items must look like Keyword=Value (e.g. StudyDate=20261130), got {item!r}.")
        key, value = (part.strip() for part in item.split("=", 1))
        if tag_for_keyword(key) is None:
            raise ConfigError(f"--query keys must be DICOM keywords (StudyDate, Modality, AccessionNumber, ...), "
                              f"got {key!r}. Check the spelling (case matters).")
        if key in ("QueryRetrieveLevel",):
            raise ConfigError("--query must not set QueryRetrieveLevel, got it; ctseg queries studies then series.")
        query[key] = value
    earliest = None
    if since:
        match = _SINCE.match(since)
        if not match:
            raise ConfigError(f"--since must look like 24h, 90m or 2d, got {since!r}.")
        if "StudyDate" in query:
            raise ConfigError("--since and --query StudyDate=... must not be combined, got both. Use one of them.")
        amount, unit = float(match.group(1)), match.group(2)
        now = now or _dt.datetime.now()
        earliest = now - _dt.timedelta(**{{"m": "minutes", "h": "hours", "d": "days"}[unit]: amount})
        query["StudyDate"] = f"{earliest:%Y%m%d}-{now:%Y%m%d}"
    if not query:
        raise ConfigError("ctseg pull must be given a query, got none. Pass --query StudyDate=YYYYMMDD (and e.g. "
                          "Modality=CT) or --since 24h; a query of the whole PACS is refused.")
    if not set(query) & (STUDY_KEYS - {"ModalitiesInStudy", "InstitutionName"}):
        raise ConfigError(f"the query must narrow the studies (StudyDate, AccessionNumber, PatientID, "
                          f"StudyInstanceUID, ... or --since), got only {sorted(query)}: it would walk every study "
                          f"of the PACS. Add e.g. StudyDate=YYYYMMDD.")
    return query, earliest


def _dataset(level: str, attributes: dict[str, str], returned: tuple[str, ...]):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key in returned:
        setattr(ds, key, "")
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def c_find_series(cfg: Config, peer: PeerOptions, query: dict[str, str], modalities: list[str]) -> list[SeriesHit]:
    """Study-level then series-level C-FIND on one association; the series matching ``query``."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    study_query = {k: v for k, v in query.items() if k in STUDY_KEYS}
    series_query = {k: v for k, v in query.items() if k not in STUDY_KEYS}
    if "Modality" not in series_query and modalities:
        series_query["Modality"] = "\\".join(modalities)
    if "ModalitiesInStudy" not in study_query and "\\" not in series_query.get("Modality", "\\"):
        study_query["ModalitiesInStudy"] = series_query["Modality"]  # lets the PACS narrow the studies too
    ae = make_ae(cfg.pacs)
    ae.add_requested_context(FIND)
    assoc = _associate(ae, cfg, peer)
    hits: list[SeriesHit] = []
    try:
        studies = _find(assoc, FIND, _dataset("STUDY", study_query, ("StudyInstanceUID", "StudyDate", "StudyTime",
                                                                    "PatientID")), peer)
        if len(studies) > cfg.pacs.max_series:
            raise ConfigError(f"the query must match at most pacs.max_series={cfg.pacs.max_series} studies, got "
                              f"{len(studies)}. Narrow it (a StudyDate, Modality=CT) or raise pacs.max_series.")
        for study in studies:
            study_uid = str(study.get("StudyInstanceUID", "") or "")
            if not study_uid:
                continue
            when = _study_datetime(study)
            found = _find(assoc, FIND, _dataset("SERIES", {**series_query, "StudyInstanceUID": study_uid},
                                                ("SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances",
                                                 "SeriesNumber")), peer)
            for series in found:
                series_uid = str(series.get("SeriesInstanceUID", "") or "")
                if not series_uid:
                    continue
                count = series.get("NumberOfSeriesRelatedInstances", None)
                hits.append(SeriesHit(study_uid, series_uid, str(series.get("Modality", "") or ""),
                                      int(count) if count not in (None, "") else None, when,
                                      key=series_key(study_uid, series_uid),
                                      patient_id=str(study.get("PatientID", "") or ""),
                                      series_number=str(series.get("SeriesNumber", "") or "")))
            if len(hits) > cfg.pacs.max_series:
                break
    finally:
        assoc.release()
    return hits


def _find(assoc, model, identifier, peer: PeerOptions) -> list:
    results = []
    final = None
    for status, found in assoc.send_c_find(identifier, model):
        code = getattr(status, "Status", None)
        if code in (0xFF00, 0xFF01) and found is not None:
            results.append(found)
        else:
            final = status
    code = getattr(final, "Status", None)
    if code is None or int(code) != 0:
        raise CtsegError(f"C-FIND on {describe_peer(peer)} must succeed, got {describe_status(final)}. Check that "
                         f"the PACS knows AE title and allows queries from it.")
    return results


def _study_datetime(ds) -> _dt.datetime | None:
    date, clock = str(ds.get("StudyDate", "") or ""), str(ds.get("StudyTime", "") or "")
    try:
        day = _dt.datetime.strptime(date[:8], "%Y%m%d")
    except ValueError:
        return None
    digits = re.sub(r"[^0-9]", "", clock.split(".")[0])[:6].ljust(6, "0")
    try:
        return day.replace(hour=int(digits[:2]), minute=int(digits[2:4]), second=int(digits[4:6]))
    except ValueError:
        return day


def _associate(ae, cfg: Config, peer: PeerOptions, **kwargs):
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=client_tls(cfg.pacs, peer),
                             **kwargs)
    except OSError as exc:
        raise CtsegError(f"the PACS {describe_peer(peer)} must be reachable, got {exc}. Check host, port and "
                         f"firewall.") from None
    if not assoc.is_established:
        raise CtsegError(f"an association with {describe_peer(peer)} must be accepted, got it rejected or aborted. "
                         f"Ask the PACS administrator to register AE title {cfg.pacs.ae_title} (and this host).")
    return assoc


# ---------------------------------------------------------------------------------------------
# Retrieve
# ---------------------------------------------------------------------------------------------

def c_get_series(cfg: Config, peer: PeerOptions, hit: SeriesHit, spool: Spool) -> tuple[int, str]:
    """C-GET one series into the spool; (instances received, final status text)."""
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    from pipeline.pacs.listen import store_handler

    ae = make_ae(cfg.pacs)
    ae.add_requested_context(GET)
    for uid in STORAGE_CLASSES:
        ae.add_requested_context(uid, RETRIEVE_SYNTAXES)
    roles = [build_role(uid, scp_role=True) for uid in STORAGE_CLASSES]
    received = []

    def counted(handler):
        def wrapper(event):
            status = handler(event)
            if status == 0:
                received.append(1)
            return status
        return wrapper

    name = f"get-{hit.key}-{time.time()}"
    handlers = [(evt.EVT_C_STORE, counted(store_handler(spool, lambda event: name)))]
    assoc = _associate(ae, cfg, peer, ext_neg=roles, evt_handlers=handlers)
    final = None
    try:
        identifier = _dataset("SERIES", {"StudyInstanceUID": hit.study_uid, "SeriesInstanceUID": hit.series_uid}, ())
        for status, _ in assoc.send_c_get(identifier, GET):
            if getattr(status, "Status", None) != 0xFF00:
                final = status
    finally:
        if assoc.is_established:
            assoc.release()
        spool.association_ended(name, released=False)
    return len(received), describe_status(final)


def c_move_series(cfg: Config, peer: PeerOptions, hit: SeriesHit, spool: Spool, counter: list) -> tuple[int, str]:
    """C-MOVE one series to ctseg's own receiver (already running); (instances received, final status)."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    ae = make_ae(cfg.pacs)
    ae.add_requested_context(MOVE)
    before = len(counter)
    assoc = _associate(ae, cfg, peer)
    final = None
    try:
        identifier = _dataset("SERIES", {"StudyInstanceUID": hit.study_uid, "SeriesInstanceUID": hit.series_uid}, ())
        for status, _ in assoc.send_c_move(identifier, cfg.pacs.move_destination or cfg.pacs.ae_title, MOVE):
            if getattr(status, "Status", None) != 0xFF00:
                final = status
    finally:
        if assoc.is_established:
            assoc.release()
    return len(counter) - before, describe_status(final)


def wado_series(peer: PeerOptions, hit: SeriesHit, spool: Spool) -> tuple[int, str]:
    """WADO-RS one series into the spool; (instances received, status text)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=peer.url)
    count = 0
    for ds in client.iter_series(hit.study_uid, hit.series_uid):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        spool.store(buffer.getvalue(), hit.study_uid, hit.series_uid, str(ds.SOPInstanceUID),
                    str(getattr(ds, "Modality", "")), f"wado-{hit.key}")
        count += 1
    spool.association_ended(f"wado-{hit.key}", released=False)
    return count, "WADO-RS complete"


def qido_series(peer: PeerOptions, query: dict[str, str], modalities: list[str], limit: int) -> list[SeriesHit]:
    """QIDO-RS series search (one request; DICOMweb matches study and series attributes together)."""
    from dicomweb_client.api import DICOMwebClient
    from pydicom.dataset import Dataset

    filters = dict(query)
    if "Modality" not in filters and modalities:
        filters["Modality"] = modalities[0] if len(modalities) == 1 else ",".join(modalities)
    client = DICOMwebClient(url=peer.url)
    found = client.search_for_series(search_filters=filters, limit=limit + 1,
                                     fields=["NumberOfSeriesRelatedInstances", "StudyDate", "StudyTime", "PatientID",
                                             "SeriesNumber"])
    hits = []
    for item in found:
        ds = Dataset.from_json(item)
        study_uid, series_uid = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        if study_uid and series_uid:
            count = ds.get("NumberOfSeriesRelatedInstances", None)
            hits.append(SeriesHit(study_uid, series_uid, str(ds.get("Modality", "") or ""),
                                  int(count) if count not in (None, "") else None, _study_datetime(ds),
                                  key=series_key(study_uid, series_uid),
                                  patient_id=str(ds.get("PatientID", "") or ""),
                                  series_number=str(ds.get("SeriesNumber", "") or "")))
    return hits


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def run_pull(cfg: Config, model_dir: Path, output_dir: Path, query_items: list[str], since: str | None = None,
             retry_failed: bool = False, now: _dt.datetime | None = None) -> PullResult:
    """Query, retrieve and segment (see the module docstring); returns the predict report with a ``pull`` part."""
    from pipeline.pacs.batch import NodeBatch
    from pipeline.pacs.listen import spool_root, start_receiver, store_handler
    from pipeline.predict.cases import dicom_case_id

    require_pynetdicom()
    pacs = cfg.pacs
    peer = find_peer(pacs, pacs.source, "pacs.source")
    if pacs.retrieve == "wado" and not peer.url:
        raise ConfigError(f"pacs.retrieve wado needs a DICOMweb url for peer {peer.name}, got none. Set "
                          f"pacs.peers[...].url or use retrieve: get.")
    query, earliest = parse_query(query_items, since, now)
    rules = cfg.ingest.select
    explicit_modality = "Modality" in query
    batch = NodeBatch(cfg, model_dir, output_dir, retry_failed=retry_failed)
    spool = Spool(spool_root(output_dir))
    spool.prune(pacs.spool_retention_days)
    receiver = None
    hits: list[SeriesHit] = []
    try:
        batch.load()
        if peer.url:
            hits = qido_series(peer, query, rules.modalities, pacs.max_series)
        else:
            hits = c_find_series(cfg, peer, query, rules.modalities)
        if len(hits) > pacs.max_series:
            raise ConfigError(f"the query must match at most pacs.max_series={pacs.max_series} series, got more. "
                              f"Narrow it (a StudyDate, Modality=CT) or raise pacs.max_series.")
        log.info("pull: %d series found on %s", len(hits), describe_peer(peer))
        moved: list = []
        if pacs.retrieve == "move":
            handler = store_handler(spool)
            receiver = _move_receiver(cfg, spool, peer, moved, handler, start_receiver)
        preselect(hits, rules, explicit_modality, earliest)
        for hit in hits:
            if hit.state == "found":
                _pull_one(cfg, peer, hit, spool, batch, moved, dicom_case_id)
        if cfg.predict.send_to:  # results whose send failed in an earlier run (destination down) go now
            batch.send(None)
        extra = {"pull": {"source": describe_peer(peer), "retrieve": pacs.retrieve,
                          "query": sorted(query), "series": [hit.row() for hit in hits]}}
        report = batch.write_report(extra)
    finally:
        if receiver is not None:
            receiver.shutdown()
        spool.close()
        batch.close()
    retrieval_failed = [h for h in hits if h.state == "retrieve_failed"]
    failed_cases = report["counts"]["failed"] if "counts" in report else 0
    failed_sends = [row for row in report.get("sends", []) if row["status"] != "done"]
    earlier = [h for h in hits if h.state == "failed_earlier"]  # as predict: failed and not retried
    exit_code = EXIT_SOME_FAILED if retrieval_failed or failed_cases or failed_sends or earlier else EXIT_OK
    report["exit_code"] = exit_code
    report["status"] = "failed" if exit_code else "ok"
    return PullResult(report, exit_code)


def _move_receiver(cfg, spool, peer, moved, handler, start_receiver):
    """ctseg's own storage SCP for C-MOVE, accepting only the source PACS's AE title."""
    from pynetdicom import evt

    server = start_receiver(cfg, spool, cfg.pacs.listen.host, cfg.pacs.listen.port, [peer.ae_title])
    server.unbind(evt.EVT_C_STORE, server.get_handlers(evt.EVT_C_STORE)[0])

    def counting(event):
        status = handler(event)
        if status == 0:
            moved.append(1)
        return status

    server.bind(evt.EVT_C_STORE, counting)
    return server


def preselect(hits: list[SeriesHit], rules, explicit_modality: bool, earliest) -> None:
    """Pass over, before retrieving, what the ingest selection rules would not keep: other modalities, too few
    instances, and with policy 'largest' every series of a study but the one with the most instances."""
    for hit in hits:
        if earliest is not None and hit.study_datetime is not None and hit.study_datetime < earliest:
            hit.state, hit.reason = "not_selected", "study is older than --since"
        elif not explicit_modality and rules.modalities and hit.modality not in rules.modalities:
            hit.state, hit.reason = "not_selected", f"modality {hit.modality or '(none)'} is not in the selection rules"
        elif hit.instances is not None and hit.instances < rules.min_slices:
            hit.state, hit.reason = "not_selected", (f"{hit.instances} instance(s), fewer than the rules' "
                                                     f"min_slices {rules.min_slices} (a localizer?)")
    if rules.policy != "largest":
        return
    by_study: dict[str, list[SeriesHit]] = {}
    for hit in hits:
        if hit.state == "found":
            by_study.setdefault(hit.study_uid, []).append(hit)
    for group in by_study.values():
        keep = max(group, key=lambda h: (h.instances or 0, h.key))
        for hit in group:
            if hit is not keep:
                hit.state, hit.reason = "not_selected", (f"selection policy 'largest': series {keep.key} of the same "
                                                         f"study has more instances")


def _pull_one(cfg, peer, hit: SeriesHit, spool: Spool, batch, moved: list, dicom_case_id) -> None:
    case_id = dicom_case_id(SimpleNamespace(key=f"uid:{hit.study_uid}/{hit.series_uid}", patient_id=hit.patient_id,
                                            series_number=hit.series_number), cfg.ingest)
    row = batch.ledger.get(case_id)
    if row is not None and row.status == "done" and batch.ledger.verify_outputs(row) is None:
        hit.state, hit.reason, hit.cases = "already_done", "segmented earlier (ledger, outputs verified)", [case_id]
        return
    if row is not None and row.status == "failed" and not batch.retry_failed:
        hit.state, hit.reason, hit.cases = "failed_earlier", "failed earlier (use --retry-failed)", [case_id]
        return
    try:
        if cfg.pacs.retrieve == "wado":
            count, status = wado_series(peer, hit, spool)
        elif cfg.pacs.retrieve == "move":
            count, status = c_move_series(cfg, peer, hit, spool, moved)
            _wait_for_release(spool, hit.key)
        else:
            count, status = c_get_series(cfg, peer, hit, spool)
    except CtsegError as exc:
        hit.state, hit.reason = "retrieve_failed", str(exc)
        log.error("pull: series %s: %s", hit.key, exc)
        return
    row = spool.get(hit.key)
    stored = int(row["instances"]) if row else 0
    expected = hit.instances
    # without the PACS's instance count, only a fully successful retrieval (no failed sub-operation) is trusted
    unsure = expected is None and not status.startswith(("0x0000", "WADO-RS complete"))
    if count == 0 or unsure or (expected is not None and stored < expected):
        hit.state = "retrieve_failed"
        hit.reason = (f"retrieval ended with {stored} of {expected if expected is not None else '?'} instance(s) "
                      f"in the spool (final status {status}); not segmented, pull again to complete it")
        log.error("pull: series %s: %s", hit.key, hit.reason)
        return
    spool.mark_complete(hit.key)
    taken = spool.take_complete_key(hit.key)
    state, reason, cases = batch.segment(spool.folder(hit.key), hit.key)
    if taken:
        spool.finish(hit.key, state, reason, cases, stored)
    hit.state, hit.reason, hit.cases = state, reason, cases


def _wait_for_release(spool: Spool, key: str, seconds: float = 30.0) -> None:
    """C-MOVE answers after the sub-associations; give the last one a moment to be released (bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        row = spool.get(key)
        if row is None or row["state"] != "receiving" or not spool.busy(key):
            return
        time.sleep(0.1)
