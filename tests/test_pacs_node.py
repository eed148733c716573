"""The DICOM node's parts: the receive spool's states, the sends table, the CLI's checks, every DICOM output sent."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from pipeline.pacs.spool import Spool, instance_name, series_key


def _store(spool: Spool, sop: str, association: str, series: str = "1.2.3.2") -> str:
    return spool.store(b"\0" * 128 + b"DICM" + sop.encode(), "1.2.3.1", series, sop, "CT", association)


def test_spool_completes_a_series_on_release_only_when_no_other_association_still_delivers(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    key = _store(spool, "1.9.1", "a")
    _store(spool, "1.9.2", "b")
    assert spool.association_ended("a", released=True) == []  # b still delivers to the series
    assert spool.get(key)["state"] == "receiving"
    assert spool.association_ended("b", released=True) == [key]
    assert spool.get(key)["state"] == "complete" and spool.get(key)["instances"] == 2
    assert sorted(p.name for p in spool.folder(key).iterdir()) == sorted([instance_name("1.9.1"),
                                                                           instance_name("1.9.2")])
    assert not [p for p in spool.folder(key).iterdir() if ".partial-" in p.name]
    assert spool.take_complete() == (key, 2) and spool.get(key)["state"] == "segmenting"
    _store(spool, "1.9.3", "c")  # more instances while it is segmented: the outcome is not recorded
    assert spool.finish(key, "done", None, ["ct-x"], 2) is False
    assert spool.get(key)["state"] == "receiving"
    spool.close()


def test_a_connection_closed_just_before_its_release_is_reported_still_completes_the_series(tmp_path: Path):
    """pynetdicom may report the closed connection before the release (two threads): the release still counts."""
    from pipeline.pacs import spool as spool_module

    spool = Spool(tmp_path / "spool")
    key = _store(spool, "1.9.1", "a")
    spool.connection_closed("a")
    assert spool.check_quiet(60.0, "release") == []  # within the grace time nothing is decided
    assert spool.association_ended("a", released=True) == [key]
    other = _store(spool, "1.9.2", "b", series="1.2.3.9")
    spool.connection_closed("b")  # b vanished without a release: after the grace time it is an abort
    spool._closed["b"] -= spool_module.CLOSE_GRACE_SECONDS + 1
    assert spool.check_quiet(0.0, "release", now=spool.get(other)["last"] + 1) == [other]
    assert spool.get(other)["state"] == "incomplete"
    spool.close()


def test_an_aborted_association_leaves_the_series_incomplete_until_a_resend(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    key = _store(spool, "1.9.1", "a")
    assert spool.association_ended("a", released=False) == []
    assert spool.check_quiet(0.0, "release", now=spool.get(key)["last"] + 1) == [key]
    row = spool.get(key)
    assert row["state"] == "incomplete" and "aborted" in row["reason"]
    assert spool.take_complete() is None
    _store(spool, "1.9.1", "b")  # the resend of the same instance replaces it, it is not counted twice
    assert spool.get(key)["instances"] == 1 and spool.get(key)["state"] == "receiving"
    assert spool.association_ended("b", released=True) == [key]
    spool.close()


def test_quiet_mode_completes_a_series_after_the_quiet_time_but_not_while_an_association_is_open(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    key = _store(spool, "1.9.1", "a")
    later = spool.get(key)["last"] + 10
    assert spool.check_quiet(5.0, "quiet", now=later) == []  # association a is still open
    assert spool.association_ended("a", released=True, complete_on="quiet") == []  # a release is not the end
    assert spool.get(key)["state"] == "receiving"
    assert spool.check_quiet(5.0, "quiet", now=later) == [key]
    assert spool.get(key)["state"] == "complete"
    spool.close()


def test_a_restart_marks_half_received_series_incomplete_and_requeues_interrupted_segmentation(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    half = _store(spool, "1.9.1", "a", series="1.2.3.2")
    whole = _store(spool, "1.9.2", "b", series="1.2.3.3")
    spool.association_ended("b", released=True)
    assert spool.take_complete() == (whole, 1)
    spool.close()  # the process dies here: one series half received, one being segmented
    again = Spool(tmp_path / "spool")
    assert again.recover() == {"incomplete": 1, "requeued": 1}
    assert again.get(half)["state"] == "incomplete" and "interrupted" in again.get(half)["reason"]
    assert again.get(whole)["state"] == "complete"
    assert again.check_quiet(0.0, "quiet", now=again.get(half)["last"] + 100) == []  # never completed by time
    again.close()


def test_prune_deletes_old_segmented_series_and_keeps_failed_and_incomplete_ones(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    done = _store(spool, "1.9.1", "a", series="1.2.3.2")
    failed = _store(spool, "1.9.2", "a", series="1.2.3.3")
    incomplete = _store(spool, "1.9.3", "b", series="1.2.3.4")
    spool.association_ended("a", released=True)
    for key, state in ((done, "done"), (failed, "failed")):
        assert spool.take_complete_key(key)
        assert spool.finish(key, state, None, [], 1)
    assert spool.prune(7.0) == 0  # not old yet
    assert spool.prune(7.0, now=spool.get(done)["updated"] + 8 * 86400) == 1
    assert spool.get(done) is None and not spool.folder(done).exists()
    assert spool.folder(failed).is_dir() and spool.folder(incomplete).is_dir()
    assert spool.prune(0.0, now=1e12) == 0
    spool.close()


def test_series_keys_and_file_names_are_hashes_without_uids():
    key = series_key("1.2.840.99.1", "1.2.840.99.2")
    assert key.startswith("s") and "840" not in key and len(key) == 17
    assert "840" not in instance_name("1.2.840.99.3")


def test_send_without_a_destination_or_with_an_unknown_peer_is_a_usage_error(tmp_path: Path):
    from pipeline.cli import main

    (tmp_path / "out").mkdir()
    assert main(["send", "--output", str(tmp_path / "out")]) == 2
    assert main(["send", "--output", str(tmp_path / "out"), "--to", "nowhere"]) == 2


def test_pull_refuses_a_missing_source_and_a_bad_since(tmp_path: Path):
    pytest.importorskip("pynetdicom")
    from pipeline.cli import main

    assert main(["pull", "--since", "24h", "--model", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    config = tmp_path / "c.yaml"
    config.write_text("pacs: {source: p, peers: [{name: p, ae_title: PACS, port: 104}]}\n")
    assert main(["pull", "-c", str(config), "--since", "yesterday", "--model", str(tmp_path),
                 "--output", str(tmp_path / "o")]) == 2


def test_config_checks_peer_lists_and_ae_titles(tmp_path: Path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.pacs.network import find_peer

    cfg = load_config([], ["pacs.peers=[{name: planning, ae_title: TPS, host: 10.0.0.5, port: 4000}]"])
    assert find_peer(cfg.pacs, "planning", "x").port == 4000
    with pytest.raises(ConfigError, match="unknown setting 'pacs.peers.aet'"):
        load_config([], ["pacs.peers=[{name: p, aet: TPS}]"])
    bad = load_config([], ["pacs.peers=[{name: p, ae_title: A_TITLE_FAR_TOO_LONG}]"])
    with pytest.raises(ConfigError, match="1 to 16 ASCII characters"):
        find_peer(bad.pacs, "p", "x")


def test_every_dicom_output_of_a_case_is_sent_and_a_new_dicom_output_is_picked_up(tmp_path: Path):
    """predict's SEG and RTSTRUCT both arrive; an extra DICOM output recorded in the ledger is sent too, by content."""
    from helpers.pacs import Orthanc, free_port, require_orthanc

    require_orthanc()
    import shutil

    from pipeline import api
    from pipeline.predict.ledger import sha256_file

    from helpers.pacs import node_config, write_export
    from helpers.predict import write_small_model

    server = Orthanc(tmp_path / "orthanc", ctseg_port=free_port()).start()
    try:
        [files] = write_export(tmp_path / "export", seeds=(21,))
        cfg = node_config(server)
        cfg.predict.send_to = []
        cfg.predict.outputs.dicom_seg = True
        out = tmp_path / "out"
        result = api.predict(cfg, model_dir=write_small_model(tmp_path / "model"), input_path=files[0].parent,
                             output=out)
        [case] = result.report["cases"]
        sent = api.send(cfg, output=out, to=["orthanc"])
        assert sent["status"] == "ok" and sent["sent"] == 2, sent
        assert sorted(row["output"] for row in sent["sends"]) == ["dicom_seg", "rtstruct"]
        assert len(server.series_of("SEG")) == 1 and len(server.series_of("RTSTRUCT")) == 1
        assert (out / "send-report.json").is_file()
        # a future writer's DICOM output (here: a copy of the CT's first image, a DICOM file like any other)
        extra = out / f"{case['id']}.extra.dcm"
        shutil.copy(files[0], extra)
        db = sqlite3.connect(str(out / "ledger.sqlite"))
        outputs = json.loads(db.execute("SELECT outputs FROM cases").fetchone()[0])
        outputs["future_dicom"] = {"path": extra.name, "sha256": sha256_file(extra)}
        db.execute("UPDATE cases SET outputs = ?", (json.dumps(outputs),))
        db.commit()
        db.close()
        again = api.send(cfg, output=out, to=["orthanc"])
        assert (again["sent"], again["already_sent"]) == (1, 2)
        assert [row["output"] for row in again["items"]] == ["future_dicom"]
    finally:
        server.stop()
