"""DIMSE plumbing shared by pull, listen and send: our AE, peer lookup, TLS contexts, storage contexts.

pynetdicom and dicomweb-client are the optional extra ``ctseg[pacs]``; a missing install is one
line telling how to add it. pynetdicom's own loggers are kept at WARNING unless ``--debug``: its
info lines dump association requests and identifiers (which can carry patient data).
"""
from __future__ import annotations

import logging
import ssl

from pipeline.errors import ConfigError
from pipeline.pacs.options import PacsConfig, PeerOptions

log = logging.getLogger("ctseg.pacs")

# storage SOP classes a node exchanges: images ctseg reads (and may be sent by mistake: MR, PET, ...) and
# the results it writes (SEG, RTSTRUCT). At most 128 presentation contexts fit one association.
STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set Storage",
    "1.2.840.10008.5.1.4.1.1.481.1": "RT Image Storage",
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
}


def require_pynetdicom():
    try:
        import pynetdicom
    except ImportError:
        raise ConfigError("the DICOM node commands need pynetdicom, got it missing. Install the extra: "
                          "pip install 'ctseg[pacs]'.") from None
    for name in ("pynetdicom", "pynetdicom.assoc", "pynetdicom.acse", "pynetdicom.dimse", "pynetdicom.events",
                 "pynetdicom.dul", "pynetdicom.transport"):
        logger = logging.getLogger(name)
        if not logging.getLogger("ctseg").isEnabledFor(logging.DEBUG):
            logger.setLevel(logging.WARNING)
    return pynetdicom


def check_ae_title(title: str, what: str) -> str:
    if not title or len(title) > 16 or not title.isascii() or "\\" in title or title != title.strip():
        raise ConfigError(f"{what} must be an AE title of 1 to 16 ASCII characters without backslashes or "
                          f"surrounding spaces, got {title!r}. Fix it in the pacs: section of the config.")
    return title


def find_peer(cfg: PacsConfig, name: str, what: str) -> PeerOptions:
    """The peer called ``name`` in ``pacs.peers``."""
    names = [peer.name for peer in cfg.peers]
    if not name:
        raise ConfigError(f"{what} must name a peer of pacs.peers, got nothing. Known peers: "
                          f"{', '.join(names) or 'none (add one to pacs.peers)'}.")
    for peer in cfg.peers:
        if peer.name == name:
            if not peer.url:
                check_ae_title(peer.ae_title, f"pacs.peers[{name}].ae_title")
                if not 0 < peer.port < 65536:
                    raise ConfigError(f"pacs.peers[{name}].port must be 1-65535, got {peer.port}.")
            return peer
    raise ConfigError(f"{what} must name a peer of pacs.peers, got {name!r}. Known peers: "
                      f"{', '.join(names) or 'none (add one to pacs.peers)'}.")


def describe_peer(peer: PeerOptions) -> str:
    """How a peer appears in reports and logs: its name and address (no patient data)."""
    return f"{peer.name} ({peer.url})" if peer.url else f"{peer.name} ({peer.ae_title}@{peer.host}:{peer.port})"


def make_ae(cfg: PacsConfig):
    """Our application entity with the configured timeouts."""
    pynetdicom = require_pynetdicom()
    ae = pynetdicom.AE(ae_title=check_ae_title(cfg.ae_title, "pacs.ae_title"))
    ae.acse_timeout = cfg.timeout_seconds
    ae.dimse_timeout = cfg.timeout_seconds
    ae.network_timeout = cfg.timeout_seconds
    ae.connection_timeout = cfg.timeout_seconds
    return ae


def client_tls(cfg: PacsConfig, peer: PeerOptions) -> tuple | None:
    """``tls_args`` for ``AE.associate`` when the peer uses TLS, else None."""
    if not peer.tls:
        return None
    tls = cfg.tls
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=_pem(tls.ca_certificates,
                                                                             "pacs.tls.ca_certificates"))
    if tls.certificate:
        context.load_cert_chain(_pem(tls.certificate, "pacs.tls.certificate"),
                                keyfile=_pem(tls.private_key, "pacs.tls.private_key"))
    return context, peer.host


def server_tls(cfg: PacsConfig) -> ssl.SSLContext | None:
    """The receiver's SSL context when ``pacs.use_tls_for_listen``, else None."""
    if not cfg.use_tls_for_listen:
        return None
    tls = cfg.tls
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(_pem(tls.certificate, "pacs.tls.certificate"),
                            keyfile=_pem(tls.private_key, "pacs.tls.private_key"))
    if tls.require_peer_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=_pem(tls.ca_certificates, "pacs.tls.ca_certificates"))
    return context


def _pem(path: str, key: str) -> str:
    from pathlib import Path

    if not path or not Path(path).is_file():
        raise ConfigError(f"{key} must be the path of a PEM file, got {path!r}. Set it in the pacs.tls section.")
    return path


def describe_status(status) -> str:
    """'0xA700 (Out of Resources)' for a DIMSE status dataset; 'no response' when empty."""
    code = getattr(status, "Status", None)
    if code is None:
        return "no response (association aborted, timed out or refused)"
    from pynetdicom.status import code_to_category

    text = f"0x{int(code):04X} ({code_to_category(int(code))})"
    comment = getattr(status, "ErrorComment", None)
    return f"{text}: {comment}" if comment else text
