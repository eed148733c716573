"""Error types that own ctseg's exit codes and one-line user messages.

Messages follow "X must be Y, got Z. How to fix." and name the file or case they concern.
"""


class CtsegError(Exception):
    """A failure the user can act on; printed as one line without a traceback."""

    exit_code = 1


class ConfigError(CtsegError):
    """Bad arguments or configuration (exit code 2)."""

    exit_code = 2


class InputError(CtsegError):
    """An input file or folder is missing, unreadable or not what the stage needs (exit code 1)."""

    exit_code = 1


class CaseError(InputError):
    """One case failed; batch stages record it and move on to the next case."""

    def __init__(self, case_id: str, message: str):
        super().__init__(f"case {case_id}: {message}")
        self.case_id = case_id
