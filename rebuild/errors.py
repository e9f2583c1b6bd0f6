"""One root error; each subclass carries the exit code and the audit result it maps to."""

from __future__ import annotations


class RebuildError(Exception):
    """Base of every error rebuild reports to the operator (never shown as a traceback)."""

    exit_code = 1
    result = "error"


class ConfigError(RebuildError):
    """Bad usage or configuration: invalid inventory, unknown host, bad flag."""

    exit_code = 2
    result = "error"


class GateRefused(RebuildError):
    """A safety gate refused the run before anything changed."""

    exit_code = 3
    result = "refused"


class Declined(RebuildError):
    """The operator declined (or aborted) at the confirmation."""

    exit_code = 4
    result = "declined"


class BuildFailed(RebuildError):
    """nixos-rebuild (or the evaluation before it) failed."""

    exit_code = 5
    result = "build_failed"


class VerifyFailed(RebuildError):
    """Verification failed and the host stays on the new system."""

    exit_code = 6
    result = "verify_failed"


class RolledBack(RebuildError):
    """The host was returned to its previous system."""

    exit_code = 7
    result = "rolled_back"


class Interrupted(RebuildError):
    """Ctrl-C after the run started changing things."""

    exit_code = 130
    result = "interrupted"


class RemoteError(RebuildError):
    """The host could not be reached or a remote step failed unexpectedly."""

    exit_code = 6
    result = "error"


# Severity used to aggregate the outcomes of many hosts into one exit code:
# 1 > 130 > 7 > 6 > 5 > 4 > 3 > 2 > 0.
SEVERITY = (1, 130, 7, 6, 5, 4, 3, 2, 0)


def most_severe(codes: list[int]) -> int:
    """The exit code of a run over many hosts: the most severe per-host outcome."""
    if not codes:
        return 0
    rank = {code: i for i, code in enumerate(SEVERITY)}
    return min(codes, key=lambda code: rank.get(code, 0))
