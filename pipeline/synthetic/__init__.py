"""Synthetic data for the demo, tests and benchmarks: CT phantoms and real DICOM written from them.

- :mod:`pipeline.synthetic.phantoms`: abdominal CT phantoms with exact label maps (asymmetric, oblique and
  feet-first variants), used by ``ctseg demo`` and the tests.
- :mod:`pipeline.synthetic.dicom`: a real DICOM CT series (pydicom; several transfer syntaxes, gantry tilt) and an
  RTSTRUCT from a label map, for exports that exercise ingest.
- :mod:`pipeline.synthetic.jpeg_lossless`: the JPEG Lossless encoder those series can use.

Nothing in the pipeline's own stages imports this package; ``ctseg demo`` does, lazily.
"""
