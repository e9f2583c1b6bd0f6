"""The results of a run, and the one table from result to exit code (the contract's).

Every place that shows or stores an outcome (the audit record, `--json`, the console, the
generated wrapper's `--help`) takes its names, codes and meanings from here.
"""

from __future__ import annotations

from enum import StrEnum


class Result(StrEnum):
    """One host's outcome of one run, as the audit record names it."""

    OK = "ok"
    USAGE = "usage"  # bad usage or configuration, found before anything ran
    REFUSED = "refused"
    DECLINED = "declined"
    BUILD_FAILED = "build_failed"
    VERIFY_FAILED = "verify_failed"
    HOST_LOST = "host_lost"  # the host stopped answering after activation and did not return
    ROLLED_BACK = "rolled_back"
    INTERRUPTED = "interrupted"
    ERROR = "error"  # a bug in rebuild
    SKIPPED = "skipped"  # a fleet rollout stopped before this host's batch; it was not touched

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self]


EXIT_CODES: dict[Result, int] = {
    Result.OK: 0,
    Result.SKIPPED: 0,
    Result.ERROR: 1,
    Result.USAGE: 2,
    Result.REFUSED: 3,
    Result.DECLINED: 4,
    Result.BUILD_FAILED: 5,
    Result.VERIFY_FAILED: 6,
    Result.HOST_LOST: 6,
    Result.ROLLED_BACK: 7,
    Result.INTERRUPTED: 130,
}

# What each exit code means for the operator (README, reference, wrapper --help).
MEANINGS: dict[int, str] = {
    0: "done, verified",
    1: "internal error (a bug)",
    2: "bad usage or configuration: invalid inventory, unknown host, bad flag",
    3: "refused by a safety gate: operator not allowlisted, dirty tree, host locked, host key "
    "unknown or changed, no terminal for the prompt and no --yes, host unreachable before "
    "anything changed, audit log not writable",
    4: "declined or aborted at the confirmation (including Ctrl-C before anything changed)",
    5: "nixos-rebuild failed",
    6: "verification failed; the host stays on the new system (--no-rollback), or it stopped "
    "answering after activation",
    7: "the host was rolled back to the previous system (verification failed, or the host was "
    "lost and its own timer restored it)",
    130: "interrupted (Ctrl-C) after changes began; the dead-man timer protects the host",
}

# Aggregating many hosts into one exit code: the most severe wins.
SEVERITY = (1, 130, 7, 6, 5, 4, 3, 2, 0)


def most_severe(codes: list[int]) -> int:
    """The exit code of a run over many hosts: the most severe per-host outcome."""
    if not codes:
        return 0
    rank = {code: i for i, code in enumerate(SEVERITY)}
    return min(codes, key=lambda code: rank.get(code, 0))
