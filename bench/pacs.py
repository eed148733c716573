"""Benchmark: the DICOM node's network paths against dcmtk and Orthanc, wall time side by side.

Both measurements move the same synthetic CT series (512×512×N int16, N = 200, 60 with ``--quick``,
explicit little endian) over loopback, interleaved, ``--repeats`` times each (median and minimum):

- **receive**: ``storescu`` (dcmtk) sends the series in one association to ctseg's receiver (pynetdicom
  storage SCP + the atomic spool of ``ctseg listen``, no model) and, as the reference, to Orthanc (C++,
  its SQLite index and file storage). Time from the first byte to storescu's exit (release).
- **retrieve**: a C-GET of the series from Orthanc into ctseg's spool (``ctseg pull``'s path), against
  dcmtk's ``getscu`` into a folder.

Orthanc is started on free loopback ports with a temporary config and stopped at the end.

    python bench/pacs.py --output bench/results/pacs.json [--quick] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_machine import machine_info  # noqa: E402

from pipeline import atomic  # noqa: E402

from helpers.pacs import CTSEG_AET, ORTHANC_AET, Orthanc, free_port, wait_until  # noqa: E402


def write_series(folder: Path, slices: int) -> list[Path]:
    from pipeline.geometry import Volume
    from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series

    rng = np.random.default_rng(0)
    array = (rng.normal(0, 30, size=(512, 512, slices)) - 50).astype(np.int16)
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    return write_ct_series(Volume(array, affine), folder, SeriesWriteOptions(patient_name="BENCH^CT"))


def storescu(port: int, called: str, files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench/results/pacs.json"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = list(os.getloadavg())

    from pipeline.config import Config
    from pipeline.pacs.listen import start_receiver
    from pipeline.pacs.options import PeerOptions
    from pipeline.pacs.pull import SeriesHit, c_get_series
    from pipeline.pacs.spool import Spool, series_key

    slices = 60 if args.quick else 200
    with tempfile.TemporaryDirectory(prefix="ctseg-bench-pacs-") as tmp:
        tmp = Path(tmp)
        files = write_series(tmp / "series", slices)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        import pydicom

        first = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
        study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        port = free_port()
        orthanc = Orthanc(tmp / "orthanc", ctseg_port=port).start()
        cfg = Config()
        cfg.pacs.ae_title = CTSEG_AET
        cfg.pacs.timeout_seconds = 120.0
        peer = PeerOptions(name="orthanc", ae_title=ORTHANC_AET, host="127.0.0.1", port=orthanc.dicom_port)
        times: dict[str, list[float]] = {"receive_ctseg": [], "receive_orthanc": [], "retrieve_ctseg": [],
                                         "retrieve_getscu": []}
        try:
            for repeat in range(args.repeats):
                spool = Spool(tmp / f"spool-{repeat}")
                server = start_receiver(cfg, spool, "127.0.0.1", port, ["BENCH"])
                try:
                    times["receive_ctseg"].append(storescu(port, CTSEG_AET, files))
                    key = series_key(study_uid, series_uid)
                    try:
                        wait_until(lambda s=spool, k=key: s.get(k) and s.get(k)["state"] == "complete", 60, "release")
                    except AssertionError:
                        raise AssertionError(f"series not complete after storescu: {spool.get(key)}") from None
                    assert spool.get(key)["instances"] == len(files)
                finally:
                    server.shutdown()
                    spool.close()
                for study in orthanc.get("/studies"):  # Orthanc receives the series new each time
                    orthanc.request("DELETE", f"/studies/{study}")
                times["receive_orthanc"].append(storescu(orthanc.dicom_port, ORTHANC_AET, files))

                spool = Spool(tmp / f"get-{repeat}")
                hit = SeriesHit(study_uid, series_uid, "CT", len(files), key=series_key(study_uid, series_uid))
                start = time.perf_counter()
                count, status = c_get_series(cfg, peer, hit, spool)
                times["retrieve_ctseg"].append(time.perf_counter() - start)
                spool.close()
                assert count == len(files), (count, status)
                target = tmp / f"getscu-{repeat}"
                target.mkdir()
                start = time.perf_counter()
                subprocess.run(["getscu", "-aet", CTSEG_AET, "-aec", ORTHANC_AET, "-S", "-k",
                                "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}", "-k",
                                f"SeriesInstanceUID={series_uid}", "-od", str(target), "127.0.0.1",
                                str(orthanc.dicom_port)], check=True, capture_output=True, timeout=600)
                times["retrieve_getscu"].append(time.perf_counter() - start)
                assert len(list(target.iterdir())) == len(files)
        finally:
            orthanc.stop()

    def stats(values):
        return {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
                "runs_s": [round(v, 3) for v in values]}

    result = {
        "benchmark": "pacs",
        "series": {"slices": slices, "rows": 512, "columns": 512, "megabytes": round(megabytes, 1)},
        "repeats": args.repeats, **{name: stats(values) for name, values in times.items()},
        "ratios": {
            "receive_ctseg_over_orthanc": round(statistics.median(times["receive_ctseg"])
                                                / statistics.median(times["receive_orthanc"]), 3),
            "retrieve_ctseg_over_getscu": round(statistics.median(times["retrieve_ctseg"])
                                                / statistics.median(times["retrieve_getscu"]), 3)},
        "throughput_mb_s": {name: round(megabytes / statistics.median(values), 1) for name, values in times.items()},
        "machine": machine_info(load_before),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.output, result)
    print(json.dumps({k: result[k] for k in ("series", "ratios", "throughput_mb_s")}, indent=1))


if __name__ == "__main__":
    main()
