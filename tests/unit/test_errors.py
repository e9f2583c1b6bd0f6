"""Exit codes of rebuild's errors and how a fleet's outcomes aggregate into one."""

from __future__ import annotations

import pytest

from rebuild.errors import (
    BuildFailed,
    ConfigError,
    Declined,
    GateRefused,
    RebuildError,
    RolledBack,
    VerifyFailed,
    most_severe,
)


class TestExitCodes:
    @pytest.mark.parametrize(
        ("error", "code", "result"),
        [
            (ConfigError, 2, "usage"),
            (GateRefused, 3, "refused"),
            (Declined, 4, "declined"),
            (BuildFailed, 5, "build_failed"),
            (VerifyFailed, 6, "verify_failed"),
            (RolledBack, 7, "rolled_back"),
        ],
    )
    def test_each_error_carries_its_contract_exit_code(
        self, error: type[RebuildError], code: int, result: str
    ) -> None:
        """Each failure class maps to the exit code and audit result the contract gives it."""
        exc = error("boom")
        assert exc.exit_code == code
        assert exc.result == result
        assert isinstance(exc, RebuildError)
        assert str(exc) == "boom"

    def test_base_error_is_an_internal_error(self) -> None:
        """An error without a more specific class exits 1, like a bug."""
        assert RebuildError("x").exit_code == 1


class TestMostSevere:
    def test_rollback_beats_build_failure_and_refusal(self) -> None:
        """A fleet with a refused, a rolled back and a failed build host exits 7."""
        assert most_severe([0, 3, 7, 5]) == 7

    def test_no_hosts_is_success(self) -> None:
        """Nothing to aggregate is exit 0."""
        assert most_severe([]) == 0

    def test_all_ok_is_ok(self) -> None:
        """Every host done and verified is exit 0."""
        assert most_severe([0, 0, 0]) == 0

    @pytest.mark.parametrize("other", [0, 2, 3, 4, 5, 6, 7, 130])
    def test_internal_error_beats_everything(self, other: int) -> None:
        """A bug on any host (exit 1) is the fleet's exit code whatever the others did."""
        assert most_severe([other, 1, other]) == 1

    @pytest.mark.parametrize(
        ("codes", "expected"),
        [([2, 3], 3), ([4, 3], 4), ([5, 4], 5), ([6, 5], 6), ([7, 6], 7), ([2, 0], 2)],
    )
    def test_higher_outcome_codes_are_more_severe(self, codes: list[int], expected: int) -> None:
        """Between two failure codes 2..7, the later stage's code wins."""
        assert most_severe(codes) == expected
        assert most_severe(list(reversed(codes))) == expected
