"""This machine's identity and the operator allowlist decision."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

from rebuild.identity import Identity, authorize, current
from rebuild.inventory import Operator

MID = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


class TestAuthorize:
    def test_matching_machine_id_authorizes(self) -> None:
        """A listed machine-id without a hostname authorizes whatever the hostname."""
        op = Operator(name="laptop", machine_id=MID)
        assert authorize(Identity("anything", MID), (op,)) == op

    def test_unlisted_machine_id_refuses(self) -> None:
        """A machine whose id is not listed is not authorized."""
        assert authorize(Identity("laptop", OTHER), (Operator(name="a", machine_id=MID),)) is None

    def test_hostname_must_match_when_given(self) -> None:
        """With a hostname in the entry, the same machine-id on another hostname is refused."""
        ops = (Operator(name="laptop", machine_id=MID, hostname="laptop"),)
        assert authorize(Identity("desktop", MID), ops) is None
        assert authorize(Identity("laptop", MID), ops) == ops[0]

    def test_fully_qualified_hostname_matches_short_name(self) -> None:
        """`hostname = "laptop.example.org"` matches the machine called laptop."""
        ops = (Operator(name="laptop", machine_id=MID, hostname="laptop.example.org"),)
        assert authorize(Identity("laptop", MID), ops) == ops[0]

    def test_picks_the_entry_that_matches(self) -> None:
        """Among several entries, the one with this machine's id and hostname is returned."""
        ops = (
            Operator(name="other", machine_id=OTHER),
            Operator(name="wrong-host", machine_id=MID, hostname="desktop"),
            Operator(name="me", machine_id=MID, hostname="laptop"),
        )
        result = authorize(Identity("laptop", MID), ops)
        assert result is not None
        assert result.name == "me"

    def test_empty_allowlist_refuses(self) -> None:
        """Nobody may deploy when the allowlist is empty."""
        assert authorize(Identity("laptop", MID), ()) is None

    def test_empty_machine_id_refuses(self) -> None:
        """An identity whose machine-id could not be read is never authorized."""
        ops = (Operator(name="laptop", machine_id=MID),)
        assert authorize(Identity("laptop", ""), ops) is None


class TestOperatorLines:
    def test_lines_are_toml_that_authorize_this_identity(self) -> None:
        """The printed [[operators]] entry parses into an Operator that authorizes this machine."""
        me = Identity("laptop", MID)
        data = tomllib.loads(me.operator_lines("work-laptop"))
        ops = tuple(Operator(**entry) for entry in data["operators"])
        assert ops == (Operator(name="work-laptop", machine_id=MID, hostname="laptop"),)
        assert authorize(me, ops) == ops[0]

    def test_lines_do_not_authorize_another_machine(self) -> None:
        """The entry for one machine does not authorize a different machine-id."""
        data = tomllib.loads(Identity("laptop", MID).operator_lines("work-laptop"))
        ops = tuple(Operator(**entry) for entry in data["operators"])
        assert authorize(Identity("laptop", OTHER), ops) is None


class TestCurrent:
    def test_reads_machine_id_from_the_first_readable_file(self, tmp_path: Path) -> None:
        """The machine-id comes from the first file that exists, trimmed and lower-cased."""
        second = tmp_path / "dbus-machine-id"
        second.write_text(MID.upper() + "\n", encoding="ascii")
        me = current((tmp_path / "missing", second))
        assert me.machine_id == MID
        assert me.hostname == socket.gethostname().split(".")[0]

    def test_empty_file_falls_through_to_the_next(self, tmp_path: Path) -> None:
        """An empty /etc/machine-id is skipped in favour of the dbus copy."""
        empty = tmp_path / "machine-id"
        empty.write_text("\n", encoding="ascii")
        dbus = tmp_path / "dbus"
        dbus.write_text(MID + "\n", encoding="ascii")
        assert current((empty, dbus)).machine_id == MID

    def test_a_machine_id_that_is_not_ascii_matches_nobody(self, tmp_path: Path) -> None:
        """Garbage in /etc/machine-id is an unknown identity (refused by the allowlist), not an
        internal error."""
        odd = tmp_path / "machine-id"
        odd.write_bytes("0123456789abcdef0123456789abcdé".encode())
        me = current((odd,))
        assert me.machine_id == ""
        assert authorize(me, (Operator(name="x", machine_id=MID),)) is None

    def test_no_readable_file_gives_empty_id(self, tmp_path: Path) -> None:
        """Without any machine-id file the identity has an empty id (and is never authorized)."""
        me = current((tmp_path / "a", tmp_path / "b"))
        assert me.machine_id == ""
        assert authorize(me, (Operator(name="x", machine_id=MID),)) is None
