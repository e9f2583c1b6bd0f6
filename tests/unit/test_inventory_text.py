"""rebuild.inventory_text and the pure parts of rebuild.onboarding: the inventory `invoke init`
writes, the host table `invoke add-host` adds or fills in, the flag parsers, the nix call."""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from rebuild import inventory, onboarding
from rebuild.errors import ConfigError
from rebuild.identity import Identity
from rebuild.inventory_text import (
    NewHost,
    append_host,
    fill_host,
    host_block,
    parse_host_arg,
    placeholder,
    render,
    validate,
)

ME = Identity(hostname="laptop", machine_id="0123456789abcdef0123456789abcdef")
PATH = Path("inventory.toml")


def generated(*hosts: NewHost, me: Identity = ME) -> str:
    return render(flake=".", me=me, operator="work-laptop", hosts=list(hosts),
                  configurations=[h.name for h in hosts])  # fmt: skip


def uncomment_all(text: str) -> str:
    """Every commented key and table header of the file, uncommented."""
    return re.sub(r"(?m)^# (?=\[|[a-z_]+ = )", "", text)


def keys_of(data: Any, prefix: str = "") -> set[str]:
    """Dotted key paths of parsed TOML (arrays of tables as `key[]`)."""
    found: set[str] = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        found.add(path)
        if isinstance(value, dict) and key != "hosts":
            found |= keys_of(value, path + ".")
        elif key == "hosts" and not prefix:
            for host in value.values():
                found |= keys_of(host, "hosts.<name>.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                found |= keys_of(item, path + "[].")
    return found


def nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field holds (directly, optionally, or as a tuple of them: an array)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    for arg in typing.get_args(annotation):
        model, array = nested_model(arg)
        if model is not None:
            return model, array or typing.get_origin(annotation) is tuple
    return None, False


def model_keys(model: type[BaseModel], prefix: str) -> set[str]:
    """Dotted key paths of a model's fields (arrays of tables as `key[]`), hosts aside."""
    found: set[str] = set()
    for name, info in model.model_fields.items():
        found.add(prefix + name)
        sub, array = nested_model(info.annotation)
        if sub is not None and name not in ("defaults", "hosts"):
            found |= model_keys(sub, f"{prefix}{name}{'[]' if array else ''}.")
    return found


class TestRender:
    def test_parses_with_the_strict_model(self) -> None:
        """init's file is valid as written: the operator entry and the hosts given."""
        text = generated(NewHost("vps", "203.0.113.10"), NewHost("web", "web.example.org"))
        inv = inventory.parse(PATH, text)
        assert [o.machine_id for o in inv.operators] == [ME.machine_id]
        assert inv.operators[0].name == "work-laptop"
        assert inv.operators[0].hostname == "laptop"
        assert {n: h.address for n, h in inv.hosts.items()} == {
            "vps": "203.0.113.10", "web": "web.example.org"}  # fmt: skip
        assert inv.known_hosts == "known_hosts"
        assert inv.hosts["vps"].port == 22

    def test_every_key_is_there_and_valid_uncommented(self) -> None:
        """Every key of the models is in the file, commented or not, and uncommenting all of
        them still gives a valid inventory (the examples are real values)."""
        text = uncomment_all(generated(NewHost("vps", "203.0.113.10")))
        data = tomllib.loads(text)
        inventory.Inventory(**data)
        want = (
            model_keys(inventory.Inventory, "")
            | {f"defaults.{k}" for k in inventory.Defaults.model_fields}
            | model_keys(inventory.VerifySpec, "defaults.verify.")
            | model_keys(inventory.HostSettings, "hosts.<name>.")
        )
        assert keys_of(data) == want

    def test_a_missing_address_fails_validation_until_filled(self) -> None:
        """A host without an address carries a placeholder that the strict model refuses,
        saying what to run; `validate` lets it wait and reports it."""
        text = generated(NewHost("vps"), NewHost("web", "203.0.113.11"))
        with pytest.raises(ConfigError) as err:
            inventory.parse(PATH, text)
        assert "hosts.vps.address" in str(err.value)
        assert "invoke add-host --host vps --address ADDR" in str(err.value)
        inv, pending = validate(PATH, text)
        assert pending == ("vps",)
        assert inv.hosts["web"].address == "203.0.113.11"

    def test_no_machine_id_comments_the_operator_out(self) -> None:
        """Without /etc/machine-id the allowlist stays empty (and the file valid)."""
        text = generated(NewHost("vps", "203.0.113.10"), me=Identity("laptop", ""))
        assert inventory.parse(PATH, text).operators == ()
        assert "# [[operators]]" in text

    def test_given_keys_are_set_the_rest_commented(self) -> None:
        """A host block sets what was given and shows every other key commented."""
        block = host_block(NewHost("vps", "203.0.113.10", port=2222, user="deploy",
                                   attr="vps_prod", identity_file="keys/vps"))  # fmt: skip
        data = tomllib.loads(block)["hosts"]["vps"]
        assert data == {"address": "203.0.113.10", "port": 2222, "user": "deploy",
                        "attr": "vps_prod", "identity_file": "keys/vps"}  # fmt: skip
        assert "# sudo = false" in block
        assert "# [hosts.vps.verify]" in block


class TestEdit:
    HAND = (
        "# our fleet\n"
        'flake = "."   # the flake\n'
        "\n"
        "[hosts.web]   # the web server\n"
        'address = "203.0.113.11"\n'
        "[hosts.web.verify]\n"
        'units = ["nginx.service"]  # must run\n'
    )

    def test_append_keeps_every_byte_before(self) -> None:
        """A new host is appended after a blank line; the file before it is unchanged."""
        block = host_block(NewHost("vps", "203.0.113.10"))
        for text in (self.HAND, self.HAND.rstrip("\n"), self.HAND + "\n", ""):
            new = append_host(text, block)
            assert new.startswith(text)
            assert new.endswith(block)
            assert tomllib.loads(new)["hosts"]["vps"]["address"] == "203.0.113.10"

    def test_fill_in_the_placeholder_keeps_other_lines(self) -> None:
        """Filling a pending host changes its address line (its comment kept), uncomments the
        keys given, and leaves every other line as it was."""
        text = generated(NewHost("vps"), NewHost("web", "203.0.113.11"))
        values = NewHost("vps", "198.51.100.7", port=2222).given()
        new = fill_host(text, "vps", values)
        assert new is not None
        inv, pending = validate(PATH, new)
        assert pending == ()
        assert (inv.hosts["vps"].address, inv.hosts["vps"].port) == ("198.51.100.7", 2222)
        old_lines, new_lines = text.splitlines(), new.splitlines()
        assert len(old_lines) == len(new_lines)
        changed = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
        assert [b.split("#")[0].strip() for _, b in changed] == [
            'address = "198.51.100.7"', "port = 2222"]  # fmt: skip
        assert all("#" in b for _, b in changed)
        assert placeholder("vps") not in new

    def test_fill_adds_a_key_the_table_lacks(self) -> None:
        """A key neither set nor commented is added right after the table header."""
        new = fill_host(self.HAND, "web", {"port": "2222"})
        assert new is not None
        assert tomllib.loads(new)["hosts"]["web"] == {
            "address": "203.0.113.11",
            "port": 2222,
            "verify": {"units": ["nginx.service"]},
        }
        assert new.replace("port = 2222\n", "") == self.HAND

    def test_fill_without_a_table_header(self) -> None:
        """A host in an inline table has no header to edit: None (the caller refuses)."""
        assert fill_host('hosts = { web = { address = "a.example" } }\n', "web", {}) is None


class TestInputs:
    def test_host_arg(self) -> None:
        """--host NAME=ADDRESS, both parts validated as the inventory does."""
        assert parse_host_arg("vps=203.0.113.10") == ("vps", "203.0.113.10")
        assert parse_host_arg("web-1=web1.example.org") == ("web-1", "web1.example.org")

    @pytest.mark.parametrize(
        ("value", "message"),
        [("vps", "want NAME=ADDRESS"), ("=1.2.3.4", "want NAME=ADDRESS"),
         ("vps=", "want NAME=ADDRESS"), ("v;s=1.2.3.4", "not a valid name"),
         ("vps=1.2.3.4;reboot", "not an IP address or DNS name")],
    )  # fmt: skip
    def test_bad_host_arg(self, value: str, message: str) -> None:
        """A bad --host is one line naming the flag and what is wrong."""
        with pytest.raises(ConfigError, match=message) as err:
            parse_host_arg(value)
        assert "\n" not in str(err.value)
        assert str(err.value).startswith("--host")

    def test_add_host_flags(self) -> None:
        """add-host's flags go through the inventory's validators (exit 2 on any bad one)."""
        good = onboarding.HostInput.parse(onboarding.AddHostOptions(
            host="vps", address="203.0.113.10", port="2222", user="deploy",
            fingerprint="SHA256:" + "a" * 43))  # fmt: skip
        assert (good.port, good.user, good.attr) == (2222, "deploy", None)
        for bad, match in [
            ({"host": "v ps"}, "--host"), ({"port": "70000"}, "--port"),
            ({"port": "22x"}, "--port"), ({"user": "Root"}, "--user"),
            ({"address": "$(reboot)"}, "--address"), ({"attr": "a.b"}, "--attr"),
            ({"identity_file": "a b"}, "--identity-file"), ({"fingerprint": "MD5:aa"}, "--fing"),
        ]:  # fmt: skip
            opts = onboarding.AddHostOptions(**{"host": "vps", **bad})  # type: ignore[arg-type]
            with pytest.raises(ConfigError, match=match):
                onboarding.HostInput.parse(opts)


class TestNix:
    def test_list_argv(self) -> None:
        """The one nix call of init, exactly."""
        assert onboarding.list_argv("nix", "/repo") == [
            "nix", "--extra-experimental-features", "nix-command flakes", "eval", "--json",
            "/repo#nixosConfigurations", "--apply", "builtins.attrNames"]  # fmt: skip

    def test_parse_names(self) -> None:
        """Real nix prints a compact JSON list; anything else is a clear error."""
        assert onboarding.parse_names('["vps","web-1"]\n') == ["vps", "web-1"]
        for bad in ("", "{}", '["a", 1]', "«derivation»"):
            with pytest.raises(ConfigError, match="JSON list"):
                onboarding.parse_names(bad)

    def test_usable_names(self) -> None:
        """Configurations that cannot be inventory host names are set aside."""
        assert onboarding.usable_names(["vps", "web.prod", "_x", "db-1"]) == (
            ["vps", "db-1"], ["web.prod", "_x"])  # fmt: skip

    @pytest.mark.parametrize(
        ("answer", "picked"),
        [("", ["a", "b", "c"]), ("all", ["a", "b", "c"]), ("none", []), ("3 1", ["a", "c"]),
         ("b, c", ["b", "c"])],
    )  # fmt: skip
    def test_selection(self, answer: str, picked: list[str]) -> None:
        """Numbers or names, in the flake's order; empty means all."""
        assert onboarding.parse_selection(answer, ["a", "b", "c"]) == picked

    def test_bad_selection(self) -> None:
        with pytest.raises(ValueError, match="'4'"):
            onboarding.parse_selection("4", ["a", "b", "c"])
