"""One root error; each subclass names the result it ends a run with (rebuild.results maps
results to exit codes). Errors are for the shell around the decision core (gates, inventory,
seams); inside one host's deploy an outcome is a value (rebuild.core.Outcome), not an error."""

from __future__ import annotations

from rebuild.results import Result, most_severe

__all__ = [
    "BuildFailed",
    "ConfigError",
    "Declined",
    "GateRefused",
    "Interrupted",
    "RebuildError",
    "RemoteError",
    "RolledBack",
    "VerifyFailed",
    "most_severe",
]


class RebuildError(Exception):
    """Base of every error rebuild reports to the operator (never shown as a traceback)."""

    result: Result = Result.ERROR
    exit_code: int = Result.ERROR.exit_code

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls.exit_code = cls.result.exit_code  # from the one table, never a second copy


class ConfigError(RebuildError):
    """Bad usage or configuration: invalid inventory, unknown host, bad flag."""

    result = Result.USAGE


class GateRefused(RebuildError):
    """A safety gate refused the run before anything changed."""

    result = Result.REFUSED


class Declined(RebuildError):
    """The operator declined (or aborted) at the confirmation."""

    result = Result.DECLINED


class BuildFailed(RebuildError):
    """nixos-rebuild (or the evaluation before it) failed."""

    result = Result.BUILD_FAILED


class VerifyFailed(RebuildError):
    """Verification failed and the host stays on the new system."""

    result = Result.VERIFY_FAILED


class RolledBack(RebuildError):
    """The host was returned to its previous system."""

    result = Result.ROLLED_BACK


class Interrupted(RebuildError):
    """Ctrl-C after the run started changing things."""

    result = Result.INTERRUPTED


class RemoteError(RebuildError):
    """The host could not be reached or a remote step failed unexpectedly."""

    result = Result.HOST_LOST
