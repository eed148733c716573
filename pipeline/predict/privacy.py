"""Keeping input folder and file names (often a patient's name) out of predict's public outputs.

Export folders are often named after the patient (``DOE_JOHN_12345/``). By default
(``predict.full_paths: false``) the ledger, report.json/csv/html, provenance and log lines name a
case by its case id and, where a file must be named, by its path relative to the case's own folder
(the series folder, or the folder of a volume file). The full paths live only in
``<OUT>/private/inputs.json`` (folder 0700, file 0600). :class:`Redactor` rewrites any message
(reader errors, warnings, tracebacks, log records) by replacing each input path it knows, longest
first: a case's folder becomes nothing (``/exports/DOE_JOHN_12345/CT/IM7.dcm`` -> ``IM7.dcm``),
the input root ``<input>``, and the folder names between them ``<folder>``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

PRIVATE_DIR = "private"
INPUTS_FILE = "inputs.json"


class Redactor:
    """Replaces known private texts in messages; the identity when ``enabled`` is False."""

    def __init__(self, replacements: dict[str, str] | None = None, enabled: bool = True,
                 words: dict[str, str] | None = None):
        self.enabled = enabled
        self._pairs: dict[str, str] = {}
        self._words: dict[str, str] = {}  # replaced only as whole words (a folder name without a slash)
        self._pattern: re.Pattern | None = None
        self.add(replacements or {}, words)

    def add(self, replacements: dict[str, str], words: dict[str, str] | None = None) -> Redactor:
        for text, replacement in replacements.items():
            if text and text not in self._pairs:
                self._pairs[text] = replacement
        for text, replacement in (words or {}).items():
            if text and text not in self._words:
                self._words[text] = replacement
        texts = [re.escape(t) for t in sorted(self._pairs, key=len, reverse=True)]
        texts += [rf"(?<![A-Za-z0-9]){re.escape(t)}(?![A-Za-z0-9])" for t in sorted(self._words, key=len,
                                                                                    reverse=True)]
        self._pattern = re.compile("|".join(texts)) if texts else None
        return self

    def _replacement(self, match: re.Match) -> str:
        text = match.group(0)
        return self._pairs[text] if text in self._pairs else self._words[text]

    def absorb(self, other: Redactor) -> Redactor:
        """Add another redactor's replacements (a batch's log filter learns every case's folders)."""
        return self.add(other._pairs, other._words) if self.enabled else self

    def __call__(self, text):
        if not self.enabled or self._pattern is None or not isinstance(text, str):
            return text
        return self._pattern.sub(self._replacement, text)

    def all(self, texts: Iterable[str]) -> list[str]:
        return [self(text) for text in texts]


def _forms(path: Path) -> list[str]:
    """The spellings a message may use for ``path``: as given, absolute and resolved."""
    forms = {str(path), os.path.abspath(path)}
    try:
        forms.add(str(path.resolve()))
    except OSError:
        pass
    return [f for f in forms if f not in ("", ".", os.sep)]


def path_replacements(folder: Path, replacement: str) -> dict[str, str]:
    """``folder/`` -> ``replacement`` (a prefix, "" or ending in /) and ``folder`` -> its name-less form."""
    pairs = {}
    bare = replacement.rstrip("/") or "<folder>"
    for form in _forms(folder):
        pairs[form.rstrip(os.sep) + os.sep] = replacement
        pairs[form.rstrip(os.sep)] = bare
    return pairs


def case_folder(case) -> Path | None:
    """The case's own folder: the folder of its volume file, or the common folder of its DICOM files."""
    if case.path is not None:
        return Path(case.path).parent
    series = getattr(case, "series", None)
    if series is not None and getattr(series, "slices", None):
        common = Path(os.path.commonpath([str(s.path) for s in series.slices]))
        return common.parent if common.is_file() or common.suffix else common
    if case.source:
        return Path(case.source).parent
    return None


def looks_like_a_name(part: str) -> bool:
    """A folder name worth hiding even without a slash: 4+ characters with a capital, digit or underscore
    (``DOE_JOHN_12345``, ``SMITH``), not a plain word such as ``data`` or ``in`` that messages also use."""
    return len(part) >= 4 and bool(re.search(r"[A-Z0-9_]", part))


def case_redactor(case, root: Path, enabled: bool = True) -> Redactor:
    """Replacements for one case's messages: its folder, the folders up to the input root, its list entry."""
    pairs: dict[str, str] = {}
    words: dict[str, str] = {}
    folder = case_folder(case)
    root = Path(root)
    root_folder = root if root.is_dir() else root.parent
    if folder is not None:
        pairs.update(path_replacements(folder, ""))
        try:  # folders between the input root and the case's folder, also as relative paths
            relative = Path(os.path.abspath(folder)).relative_to(os.path.abspath(root_folder))
        except ValueError:
            relative = None
        if relative is not None and str(relative) != ".":
            pairs[str(relative) + os.sep] = ""
            if len(relative.parts) > 1:
                pairs[str(relative)] = "<folder>"
            for part in relative.parts:
                pairs[os.sep + part + os.sep] = f"{os.sep}<folder>{os.sep}"
                pairs[part + os.sep] = f"<folder>{os.sep}"
                if looks_like_a_name(part):
                    words[part] = "<folder>"
        if relative is None:  # outside the root (an absolute list entry): hide its nearest parents as well
            for parent in list(Path(os.path.abspath(folder)).parents)[:2]:
                if parent.parent != parent:
                    pairs.update(path_replacements(parent, "<input>/"))
    for entry in getattr(case, "private", []):
        pairs[entry] = "<list entry>"
        if Path(entry).parent != Path("."):
            pairs.update(path_replacements(Path(entry).parent, ""))
    return Redactor(pairs, enabled, words).absorb(input_redactor(root, enabled))


def input_redactor(root: Path, enabled: bool = True) -> Redactor:
    """Replacements for the input root (a folder, a volume file or a list file): ``<input>``."""
    root = Path(root)
    root_folder = root if root.is_dir() else root.parent
    pairs = path_replacements(root_folder, "<input>/")
    if root.is_file():
        for form in _forms(root):
            pairs[form] = f"<input>/{root.name}"
    return Redactor(pairs, enabled)


def public_source(case, enabled: bool = True) -> str:
    """How the ledger and reports name a case's input: full path only with ``predict.full_paths``."""
    if not enabled:
        return case.source
    if case.error is not None:
        return "input list entry (see private/inputs.json)"
    if case.is_dicom:
        return f"DICOM series [{case.series.short_key}]"
    return Path(case.path).name if case.path is not None else case.case_id


def write_private(output_dir: Path, name: str, data: dict) -> Path:
    """Write ``<OUT>/private/<name>`` readable by the owner only (folder 0700, file 0600), atomically."""
    folder = Path(output_dir) / PRIVATE_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / name
    tmp = folder / f".{name}.partial-{os.getpid()}"
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class RedactingFilter(logging.Filter):
    """Rewrites every log record's message with a :class:`Redactor` before any handler writes it."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redactor.enabled:
            try:
                message = record.getMessage()
            except Exception:  # a malformed record is left to logging's own error handling
                return True
            record.msg, record.args = self.redactor(message), None
        return True
