"""TLS for the DICOM node: the receiver accepts only TLS callers with a certificate from the configured CA."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from helpers.pacs import free_port


def _certificates(folder: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=ctseg test CA")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_tls_receiver_stores_from_a_certified_caller_and_refuses_plain_and_uncertified_ones(tmp_path: Path):
    pytest.importorskip("pynetdicom")
    from pynetdicom import AE

    from pipeline.config import Config
    from pipeline.pacs.listen import start_receiver
    from pipeline.pacs.network import client_tls
    from pipeline.pacs.options import PeerOptions
    from pipeline.pacs.spool import Spool
    from pipeline.synthetic.dicom import write_ct_series
    from pipeline.synthetic.phantoms import PhantomOptions, make_phantom

    certs = _certificates(tmp_path / "certs")
    cfg = Config()
    cfg.pacs.use_tls_for_listen = True
    cfg.pacs.tls.certificate, cfg.pacs.tls.private_key = str(certs["server.pem"]), str(certs["server.key"])
    cfg.pacs.tls.ca_certificates = str(certs["ca.pem"])
    cfg.pacs.timeout_seconds = 10.0
    port = free_port()
    spool = Spool(tmp_path / "spool")
    server = start_receiver(cfg, spool, "127.0.0.1", port, ["SENDER"])
    try:
        files = write_ct_series(make_phantom(1, PhantomOptions(shape=24, slices=4)).image, tmp_path / "ct")
        dataset = pydicom.dcmread(str(files[0]))

        def sender(tls_args=None):
            ae = AE(ae_title="SENDER")
            ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
            return ae.associate("127.0.0.1", port, ae_title="CTSEG", tls_args=tls_args)

        # the client side as ctseg builds it for a peer with tls: true (its own certificate, the CA to trust)
        client_cfg = Config()
        client_cfg.pacs.tls.certificate, client_cfg.pacs.tls.private_key = (str(certs["client.pem"]),
                                                                            str(certs["client.key"]))
        client_cfg.pacs.tls.ca_certificates = str(certs["ca.pem"])
        args = client_tls(client_cfg.pacs, PeerOptions(name="node", ae_title="CTSEG", host="127.0.0.1", port=port,
                                                       tls=True))
        assoc = sender(args)
        assert assoc.is_established
        assert assoc.send_c_store(dataset).Status == 0
        assoc.release()
        assert [row["instances"] for row in spool.rows()] == [1]

        plain = sender()
        assert not plain.is_established
        no_certificate = Config()
        no_certificate.pacs.tls.ca_certificates = str(certs["ca.pem"])
        uncertified = sender(client_tls(no_certificate.pacs, PeerOptions(name="n", ae_title="CTSEG",
                                                                          host="127.0.0.1", port=port, tls=True)))
        assert not uncertified.is_established
        assert [row["instances"] for row in spool.rows()] == [1]
    finally:
        server.shutdown()
        spool.close()
