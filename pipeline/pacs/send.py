"""Sending each finished case's DICOM results (SEG, RTSTRUCT, ...) to a peer, recorded in the ledger.

What is sent: every output of a ``done`` case in the predict ledger that is a DICOM file (found by
its content, so a new DICOM writer's output is picked up without a change here). How: C-STORE on
one association per destination and run, or STOW-RS when the peer has a ``url``.

The cases and their outputs come from the predict ledger (:func:`~pipeline.predict.ledger.read_case_rows`,
whichever layout it has). Each send is a row of ``<OUT>/sends.sqlite``, which this module owns (a
rollback-journal SQLite file beside the ledger, so it works in either ledger layout): case, output
name, destination, the file's SHA-256, status ``done`` / ``failed``, the peer's status (e.g.
``0xA700 (Failure)``), attempts and time. A rerun sends what is not ``done`` with the same
checksum: failed sends are retried, a rewritten output is sent again, sent ones are not repeated.
A destination that is down fails the sends (exit code 3), never the segmentation.
"""
from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.pacs.network import client_tls, describe_peer, describe_status, find_peer, make_ae
from pipeline.pacs.options import PacsConfig, PeerOptions

log = logging.getLogger("ctseg.pacs")

SENDS_FILE = "sends.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sends (
    case_id TEXT NOT NULL, output TEXT NOT NULL, destination TEXT NOT NULL, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, sop_class TEXT, status TEXT NOT NULL, peer_status TEXT, error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL,
    PRIMARY KEY (case_id, output, destination));
"""


@dataclass
class Item:
    """One DICOM output of one case to send."""

    case_id: str
    output: str
    path: Path
    sha256: str


def _connect(folder: Path) -> sqlite3.Connection:
    from pipeline.predict.ledger import has_ledger

    if not has_ledger(Path(folder)):
        raise ConfigError(f"the predict folder {folder} must hold a predict ledger (ledger.sqlite or "
                          f"ledger/*.sqlite), got none. Point --output at the folder 'ctseg predict' wrote.")
    db = sqlite3.connect(str(Path(folder) / SENDS_FILE), timeout=60.0, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout = 60000")
    db.executescript(_SCHEMA)
    return db


def is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_outputs(folder: Path, case_ids: list[str] | None = None) -> list[Item]:
    """Every DICOM output of every done case (of ``case_ids`` when given), from the ledger."""
    from pipeline.predict.ledger import read_case_rows

    items = []
    for row in read_case_rows(Path(folder)):
        if row.status != "done" or (case_ids is not None and row.case_id not in case_ids):
            continue
        for name, entry in sorted(row.outputs.items()):
            path = Path(folder) / entry["path"]
            if is_dicom_file(path):
                items.append(Item(row.case_id, name, path, entry["sha256"]))
    return items


def send_results(cfg: PacsConfig, folder: Path, destinations: list[str], case_ids: list[str] | None = None,
                 resend: bool = False) -> dict:
    """Send the DICOM results of ``folder``'s done cases to each named peer; returns the send report.

    ``case_ids``: only these cases. ``resend``: send again what was already sent.
    """
    if not destinations:
        raise ConfigError("ctseg send must have a destination, got none. Pass --to NAME or set predict.send_to "
                          "to peer names of pacs.peers.")
    peers = [find_peer(cfg, name, "the send destination") for name in destinations]
    folder = Path(folder)
    db = _connect(folder)
    report: dict[str, Any] = {"stage": "send", "folder": str(folder), "destinations": [describe_peer(p) for p in peers],
              "sent": 0, "already_sent": 0, "failed": 0, "items": []}
    try:
        items = dicom_outputs(folder, case_ids)
        for peer in peers:
            todo = []
            for item in items:
                row = db.execute("SELECT status, sha256 FROM sends WHERE case_id = ? AND output = ? AND "
                                 "destination = ?", (item.case_id, item.output, peer.name)).fetchone()
                if not resend and row is not None and row["status"] == "done" and row["sha256"] == item.sha256:
                    report["already_sent"] += 1
                    continue
                todo.append(item)
            if todo:
                results = _stow(peer, todo) if peer.url else _c_store(cfg, peer, todo)
                for item, (status, peer_status, error, sop_class) in zip(todo, results, strict=True):
                    _record(db, item, peer.name, status, peer_status, error, sop_class)
                    report["sent" if status == "done" else "failed"] += 1
                    report["items"].append({"case": item.case_id, "output": item.output, "to": peer.name,
                                            "status": status, "peer_status": peer_status, "error": error})
                    if status != "done":
                        log.error("send: %s %s to %s failed: %s", item.case_id, item.output, peer.name, error)
        report["status"] = "failed" if report["failed"] else "ok"
        report["sends"] = send_rows(db, case_ids)
    finally:
        db.close()
    if report["sent"] or report["failed"]:
        log.info("send: %d sent, %d already sent, %d failed", report["sent"], report["already_sent"],
                 report["failed"])
    return report


def send_rows(db: sqlite3.Connection, case_ids: list[str] | None = None) -> list[dict]:
    rows = [dict(r) for r in db.execute("SELECT * FROM sends ORDER BY case_id, output, destination")]
    return [r for r in rows if case_ids is None or r["case_id"] in case_ids]


def read_sends(folder: Path) -> list[dict]:
    """The send rows of a predict folder (empty when nothing was ever sent)."""
    if not (Path(folder) / SENDS_FILE).is_file():
        return []
    db = _connect(folder)
    try:
        return send_rows(db)
    finally:
        db.close()


def _record(db, item: Item, destination: str, status: str, peer_status: str | None, error: str | None,
            sop_class: str | None) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("INSERT INTO sends (case_id, output, destination, path, sha256, sop_class, status, peer_status, "
                   "error, attempts, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?) "
                   "ON CONFLICT (case_id, output, destination) DO UPDATE SET path = excluded.path, "
                   "sha256 = excluded.sha256, sop_class = excluded.sop_class, status = excluded.status, "
                   "peer_status = excluded.peer_status, error = excluded.error, attempts = sends.attempts + 1, "
                   "updated = excluded.updated",
                   (item.case_id, item.output, destination, item.path.name, item.sha256, sop_class, status,
                    peer_status, error, time.time()))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _c_store(cfg: PacsConfig, peer: PeerOptions, items: list[Item]) -> list[tuple]:
    """C-STORE each item on one association; (status, peer status, error, SOP class) per item."""
    import pydicom

    datasets, results = [], [None] * len(items)
    for n, item in enumerate(items):
        try:
            datasets.append(pydicom.dcmread(str(item.path)))
        except Exception as exc:  # a damaged output fails its own send only
            datasets.append(None)
            results[n] = ("failed", None, f"{item.path.name} is not readable DICOM: {type(exc).__name__}", None)
    ae = make_ae(cfg)
    classes = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets if ds})
    for sop_class, syntax in classes:
        ae.add_requested_context(sop_class, [syntax, "1.2.840.10008.1.2.1"] if syntax != "1.2.840.10008.1.2.1"
                                 else [syntax])
    where = describe_peer(peer)
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=client_tls(cfg, peer))
    except OSError as exc:
        assoc = None
        reason = f"cannot reach {where}: {exc}"
    else:
        reason = (f"association with {where} was rejected or failed (is the peer running, and does it know AE "
                  f"title {cfg.ae_title}?)")
    if assoc is None or not assoc.is_established:
        return [r or ("failed", None, reason, None) for r in results]
    try:
        for n, ds in enumerate(datasets):
            if ds is None:
                continue
            sop_class = str(ds.SOPClassUID)
            if not assoc.is_established:
                results[n] = ("failed", None, f"association with {where} ended before this instance was sent",
                              sop_class)
                continue
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:  # pynetdicom raises for contexts the peer refused
                results[n] = ("failed", None, f"{where} did not accept it: {type(exc).__name__}: {exc}", sop_class)
                continue
            code = getattr(status, "Status", None)
            text = describe_status(status)
            if code is not None and (int(code) == 0 or 0xB000 <= int(code) <= 0xBFFF):
                results[n] = ("done", text, None, sop_class)
            else:
                results[n] = ("failed", text, f"{where} answered {text}", sop_class)
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _stow(peer: PeerOptions, items: list[Item]) -> list[tuple]:
    """STOW-RS each item (dicomweb-client); (status, HTTP status, error, SOP class) per item."""
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise ConfigError("STOW-RS needs dicomweb-client, got it missing. Install the extra: "
                          "pip install 'ctseg[pacs]'.") from None
    import pydicom

    client = DICOMwebClient(url=peer.url)
    results = []
    for item in items:
        sop_class = None
        try:
            ds = pydicom.dcmread(str(item.path))
            sop_class = str(ds.SOPClassUID)
            client.store_instances(datasets=[ds])
            results.append(("done", "HTTP 200", None, sop_class))
        except Exception as exc:  # requests' errors carry the HTTP status; connection errors fail this item
            code = getattr(getattr(exc, "response", None), "status_code", None)
            results.append(("failed", f"HTTP {code}" if code else None,
                            f"STOW-RS to {describe_peer(peer)} failed: {type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0][:200]}", sop_class))
    return results
