"""Options of the DICOM node (``pacs:`` in the config): our AE, the peers, the receiver, TLS and timeouts.

Every node setting lives here, in the typed config; nothing is read from environment variables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class PeerOptions:
    """A remote DICOM node (PACS, planning system) that ctseg queries, retrieves from or sends to."""

    name: str = field(default="", metadata={
        "help": "Name used by pacs.source and predict.send_to, e.g. 'pacs' or 'planning'."})
    ae_title: str = field(default="", metadata={"help": "The peer's AE title (ask its administrator)."})
    host: str = field(default="127.0.0.1", metadata={"help": "The peer's host name or IP address."})
    port: int = field(default=104, metadata={"help": "The peer's DICOM port."})
    url: str = field(default="", metadata={
        "help": "DICOMweb base URL (QIDO/WADO/STOW-RS), e.g. http://pacs:8042/dicom-web. When set, this peer is "
                "reached over DICOMweb instead of DIMSE (C-FIND/C-GET/C-STORE)."})
    tls: bool = field(default=False, metadata={"help": "Use TLS (pacs.tls) for DIMSE associations with this peer."})


@dataclass
class ListenOptions:
    """The C-STORE receiver of ``ctseg listen`` (also the C-MOVE destination of ``ctseg pull``)."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "Address to listen on. 127.0.0.1 accepts only this machine; set the hospital network's "
                "interface address deliberately."})
    port: int = field(default=11112, metadata={"help": "DICOM port to listen on."})
    allowed_calling_aes: list[str] = field(default_factory=list, metadata={
        "help": "Calling AE titles allowed to associate (the PACS, the scanners). Required: an empty list refuses "
                "to start the receiver."})
    complete_on: Literal["release", "quiet"] = field(default="release", metadata={
        "help": "When a received series counts as complete: release (its association was released normally) or "
                "quiet (no instance arrived for quiet_seconds; for senders that use one association per image)."})
    quiet_seconds: float = field(default=30.0, metadata={
        "help": "Quiet time for complete_on: quiet. With release, a series whose association was aborted is "
                "reported incomplete after this time and waits for a resend."})
    max_associations: int = field(default=4, metadata={"help": "Concurrent associations accepted."})


@dataclass
class TlsOptions:
    """TLS for DIMSE (pynetdicom's ssl support); files are PEM paths."""

    certificate: str = field(default="", metadata={"help": "This node's certificate (PEM)."})
    private_key: str = field(default="", metadata={"help": "This node's private key (PEM)."})
    ca_certificates: str = field(default="", metadata={
        "help": "CA certificate(s) the peers' certificates must be signed by (PEM)."})
    require_peer_certificate: bool = field(default=True, metadata={
        "help": "The receiver accepts only callers presenting a certificate signed by ca_certificates."})


@dataclass
class PacsConfig:
    """ctseg as a DICOM node (``ctseg pull``, ``ctseg listen``, ``ctseg send``)."""

    ae_title: str = field(default="CTSEG", metadata={
        "help": "ctseg's own AE title (at most 16 characters); the PACS administrator registers it."})
    peers: list[PeerOptions] = field(default_factory=list, metadata={
        "help": "Remote nodes, each {name, ae_title, host, port} or {name, url}."})
    source: str = field(default="", metadata={"help": "Name of the peer ctseg pull queries and retrieves from."})
    retrieve: Literal["get", "move", "wado"] = field(default="get", metadata={
        "help": "How ctseg pull retrieves: get (C-GET on the query association), move (C-MOVE to ctseg's own "
                "receiver on pacs.listen.port; the PACS must know move_destination) or wado (WADO-RS; the "
                "source needs a url)."})
    move_destination: str = field(default="", metadata={
        "help": "AE title the PACS knows for ctseg's receiver (C-MOVE destination); empty = pacs.ae_title."})
    listen: ListenOptions = field(default_factory=ListenOptions)
    tls: TlsOptions = field(default_factory=TlsOptions)
    use_tls_for_listen: bool = field(default=False, metadata={"help": "The receiver accepts only TLS associations."})
    timeout_seconds: float = field(default=30.0, metadata={
        "help": "Network, association and DIMSE response timeout (s); a peer that does not answer fails the "
                "operation after this long."})
    spool_retention_days: float = field(default=7.0, metadata={
        "help": "Received images of series that were segmented (or skipped) are deleted from <OUT>/private/"
                "pacs-spool this many days later, at the next pull or listen start; failed and incomplete series "
                "are kept. 0 keeps everything."})
    max_series: int = field(default=500, metadata={
        "help": "ctseg pull retrieves at most this many series per run (a query that matches more is refused)."})
