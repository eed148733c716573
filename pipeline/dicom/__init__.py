"""Reading CT exports: header scan, series selection, volume assembly and plausibility checks.

Modules: :mod:`.header` (one file's header), :mod:`.scan` (an export folder → series),
:mod:`.select` (which series ingest keeps), :mod:`.pixels` (pixel decoding), :mod:`.assemble`
(a series → one HU volume with exact geometry) and :mod:`.plausibility` (is this CT in HU?).
"""
