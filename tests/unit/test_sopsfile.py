"""Tests for rebuild.sopsfile: enrolling a host's age recipient in .sops.yaml."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from rebuild.sopsfile import (
    EnrollResult,
    SopsFileError,
    anchor_for_host,
    enroll,
    files_matching,
    governing_rules,
    sops_updatekeys_argv,
)

# Real recipients (ssh-to-age outputs published in Mic92/ssh-to-age's README).
ALICE = "age1hjm3aujg9e79f5yth8a2cejzdjg5n9vnu96l05p70uvfpeltnpms7yy3pp"
WEB = "age1v8zjc47jmlqwefyu66s0d4ke98qr4vnuj3cpvs4z9npfdw833dxqwjrhzv"
VPS = "age17044m9wgakla6pzftf4srtl3h5mcsr85jysgt5fg23zpnta8sfdqhzn452"
VPS_OLD = "age18s8m9hvlrwvltgys4lafyyqe356ntc7e06t4kd2nccqm5amsaa2s878mju"

VPS_REGEX = r"secrets/vps/[^/]+\.(yaml|json|env|ini)$"
COMMON_REGEX = r"secrets/common\.yaml$"

EXAMPLE = f"""\
# admins and hosts
keys:
  - &admin_alice {ALICE}   # alice's laptop
  - &host_web {WEB}
creation_rules:
  # vps secrets
  - path_regex: secrets/vps/[^/]+\\.(yaml|json|env|ini)$
    key_groups:
      - age:
          - *admin_alice
  - path_regex: secrets/common\\.yaml$
    key_groups:
      - age:
          - *admin_alice
          - *host_web
"""

EXAMPLE_ENROLLED = f"""\
# admins and hosts
keys:
  - &admin_alice {ALICE}   # alice's laptop
  - &host_web {WEB}
  - &host_vps {VPS}
creation_rules:
  # vps secrets
  - path_regex: secrets/vps/[^/]+\\.(yaml|json|env|ini)$
    key_groups:
      - age:
          - *admin_alice
          - *host_vps
  - path_regex: secrets/common\\.yaml$
    key_groups:
      - age:
          - *admin_alice
          - *host_web
"""


def _load(text: str) -> Any:
    return YAML(typ="safe", pure=True).load(text)


def _assert_idempotent(result: EnrollResult, host: str, recipient: str, regex: str) -> None:
    again = enroll(result.text, host, recipient, regex)
    assert again == EnrollResult(result.text, False, None, result.rules)


def _is_subsequence(lines: list[str], of: list[str]) -> bool:
    it = iter(of)
    return all(line in it for line in lines)


# --------------------------------------------------------------------------- the example


def test_enroll_example_exact_output() -> None:
    result = enroll(EXAMPLE, "vps", VPS, VPS_REGEX)
    assert result.text == EXAMPLE_ENROLLED
    assert result.changed is True
    assert result.previous_recipient is None
    assert result.rules == (VPS_REGEX,)


def test_enroll_example_second_run_is_unchanged() -> None:
    first = enroll(EXAMPLE, "vps", VPS, VPS_REGEX)
    second = enroll(first.text, "vps", VPS, VPS_REGEX)
    assert second.changed is False
    assert second.text == first.text
    assert second.previous_recipient is None
    assert second.rules == (VPS_REGEX,)


def test_enroll_example_semantics() -> None:
    data = _load(enroll(EXAMPLE, "vps", VPS, VPS_REGEX).text)
    assert data["keys"] == [ALICE, WEB, VPS]
    assert data["creation_rules"][0]["key_groups"] == [{"age": [ALICE, VPS]}]
    assert data["creation_rules"][1]["key_groups"] == [{"age": [ALICE, WEB]}]


def test_rules_lists_every_rule_that_includes_the_host() -> None:
    # host_web is already in keys and in the common rule; enrolling it for the vps
    # secrets adds the alias there and reports both rules.
    result = enroll(EXAMPLE, "web", WEB, VPS_REGEX)
    assert result.changed
    assert result.rules == (VPS_REGEX, COMMON_REGEX)
    assert result.text.count(f"&host_web {WEB}") == 1
    assert "          - *admin_alice\n          - *host_web\n  - path_regex: secrets/common" in (
        result.text
    )


def test_already_enrolled_host_is_a_no_op_with_rules() -> None:
    result = enroll(EXAMPLE, "web", WEB, COMMON_REGEX)
    assert result == EnrollResult(EXAMPLE, False, None, (COMMON_REGEX,))


# --------------------------------------------------------------------------- reinstall


REINSTALL = f"""\
keys:
  - &admin_alice {ALICE}
  - &host_vps {VPS_OLD} # vps, installed 2024
creation_rules:
  - path_regex: secrets/vps/[^/]+\\.(yaml|json|env|ini)$
    key_groups:
      - age:
          - *admin_alice
          - *host_vps # the host itself
  - path_regex: secrets/legacy\\.yaml$
    age: {ALICE},{VPS_OLD}
"""


def test_reinstalled_host_key_is_replaced() -> None:
    result = enroll(REINSTALL, "vps", VPS, VPS_REGEX)
    assert result.changed
    assert result.previous_recipient == VPS_OLD
    assert result.text == REINSTALL.replace(VPS_OLD, VPS)
    assert result.rules == (VPS_REGEX, r"secrets/legacy\.yaml$")
    _assert_idempotent(result, "vps", VPS, VPS_REGEX)


def test_reinstalled_host_quoted_and_literal_copies() -> None:
    text = f"""\
keys:
  - &host_vps "{VPS_OLD}"
creation_rules:
  - path_regex: x$
    key_groups:
      - age: ['{VPS_OLD}']
"""
    result = enroll(text, "vps", VPS, "x$")
    assert result.previous_recipient == VPS_OLD
    assert result.text == text.replace(VPS_OLD, VPS)
    _assert_idempotent(result, "vps", VPS, "x$")


def test_reinstalled_host_added_to_a_new_rule() -> None:
    result = enroll(REINSTALL, "vps", VPS, "extra$")
    assert result.previous_recipient == VPS_OLD
    assert result.rules == (VPS_REGEX, r"secrets/legacy\.yaml$", "extra$")
    assert result.text.startswith(REINSTALL.replace(VPS_OLD, VPS))
    assert result.text.endswith(
        "  - path_regex: extra$\n    key_groups:\n      - age:\n          - *host_vps\n"
        "          - *admin_alice\n"
    )
    _assert_idempotent(result, "vps", VPS, "extra$")


def test_catch_all_rule_is_reported_as_empty_regex() -> None:
    text = (
        f"keys:\n  - &host_vps {VPS}\ncreation_rules:\n  - key_groups:\n      - age: [*host_vps]\n"
    )
    result = enroll(text, "vps", VPS, "x$")
    assert result.rules == ("", "x$")


# --------------------------------------------------------------------------- new rule


def test_new_rule_is_appended_with_host_and_admins() -> None:
    text = EXAMPLE + "# end of file\n"
    result = enroll(text, "db", VPS, r"secrets/db/.*$")
    assert result.text == (
        EXAMPLE.replace(f"  - &host_web {WEB}\n", f"  - &host_web {WEB}\n  - &host_db {VPS}\n")
        + """\
  - path_regex: secrets/db/.*$
    key_groups:
      - age:
          - *host_db
          - *admin_alice
# end of file
"""
    )
    assert result.rules == (r"secrets/db/.*$",)
    _assert_idempotent(result, "db", VPS, r"secrets/db/.*$")


def test_new_rule_regex_is_quoted_when_needed() -> None:
    result = enroll(EXAMPLE, "vps", VPS, r"[^/]+\.vps\.yaml$")
    assert "  - path_regex: '[^/]+\\.vps\\.yaml$'\n" in result.text
    assert _load(result.text)["creation_rules"][2]["path_regex"] == r"[^/]+\.vps\.yaml$"
    _assert_idempotent(result, "vps", VPS, r"[^/]+\.vps\.yaml$")


def test_new_rule_after_trailing_comments_of_last_rule() -> None:
    text = EXAMPLE + "\n  # - path_regex: old$\n"
    result = enroll(text, "vps", VPS, "new$")
    body = result.text.split("\n")
    # the new rule follows the last rule's content; the trailing comment stays last
    assert body[-3:] == ["", "  # - path_regex: old$", ""]
    assert _is_subsequence(text.splitlines(), result.text.splitlines())


# --------------------------------------------------------------------------- flat form


def test_flat_age_string_gets_the_recipient() -> None:
    text = f"""\
keys:
  - &admin_alice {ALICE}
creation_rules:
  - path_regex: secrets/vps/[^/]+\\.(yaml|json|env|ini)$
    age: {ALICE},{WEB}  # flat form
"""
    result = enroll(text, "vps", VPS, VPS_REGEX)
    assert (
        result.text
        == f"""\
keys:
  - &admin_alice {ALICE}
  - &host_vps {VPS}
creation_rules:
  - path_regex: secrets/vps/[^/]+\\.(yaml|json|env|ini)$
    age: {ALICE},{WEB},{VPS}  # flat form
"""
    )
    assert result.rules == (VPS_REGEX,)
    _assert_idempotent(result, "vps", VPS, VPS_REGEX)


def test_flat_age_string_keeps_separator_and_quotes() -> None:
    text = f'creation_rules:\n  - path_regex: x$\n    age: "{ALICE}, {WEB}"\n'
    result = enroll(text, "vps", VPS, "x$")
    assert f'    age: "{ALICE}, {WEB}, {VPS}"\n' in result.text
    _assert_idempotent(result, "vps", VPS, "x$")


def test_flat_age_list() -> None:
    text = f"keys:\n  - &a {ALICE}\ncreation_rules:\n  - path_regex: x$\n    age:\n      - *a\n"
    result = enroll(text, "vps", VPS, "x$")
    assert result.text.endswith("    age:\n      - *a\n      - *host_vps\n")


# --------------------------------------------------------------------------- empty / missing


NEW_DOCUMENT = f"""\
keys:
  - &host_vps {VPS}
creation_rules:
  - path_regex: secrets/vps/[^/]+\\.(yaml|json|env|ini)$
    key_groups:
      - age:
          - *host_vps
"""


@pytest.mark.parametrize("text", ["", "\n", "   \n\n", "---\n"])
def test_empty_file_yields_a_new_document(text: str) -> None:
    result = enroll(text, "vps", VPS, VPS_REGEX)
    assert result.text.endswith(NEW_DOCUMENT)
    assert result.changed
    assert result.rules == (VPS_REGEX,)
    _assert_idempotent(result, "vps", VPS, VPS_REGEX)


def test_comment_only_file_keeps_its_comments() -> None:
    result = enroll("# sops configuration\n", "vps", VPS, VPS_REGEX)
    assert result.text == "# sops configuration\n" + NEW_DOCUMENT
    _assert_idempotent(result, "vps", VPS, VPS_REGEX)


def test_missing_keys_list_is_created_at_the_top() -> None:
    text = "# header\ncreation_rules:\n  - path_regex: x$\n    key_groups:\n      - age: []\n"
    result = enroll(text, "vps", VPS, "x$")
    assert result.text == (
        f"# header\nkeys:\n  - &host_vps {VPS}\ncreation_rules:\n  - path_regex: x$\n"
        "    key_groups:\n      - age: [*host_vps]\n"
    )
    _assert_idempotent(result, "vps", VPS, "x$")


def test_missing_creation_rules_are_appended() -> None:
    text = f"keys:\n- &admin {ALICE}  # me\n"
    result = enroll(text, "vps", VPS, "x$")
    assert result.text == (
        f"keys:\n- &admin {ALICE}  # me\n- &host_vps {VPS}\ncreation_rules:\n"
        "- path_regex: x$\n  key_groups:\n  - age:\n    - *host_vps\n    - *admin\n"
    )
    _assert_idempotent(result, "vps", VPS, "x$")


def test_null_keys_and_rules() -> None:
    text = "keys:\ncreation_rules:  # none yet\n"
    result = enroll(text, "vps", VPS, "x$")
    assert _load(result.text) == {
        "keys": [VPS],
        "creation_rules": [{"path_regex": "x$", "key_groups": [{"age": [VPS]}]}],
    }
    assert "creation_rules:  # none yet\n" in result.text
    _assert_idempotent(result, "vps", VPS, "x$")


# --------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            f"keys:\n- &a {ALICE}\ncreation_rules:\n- path_regex: x$\n  key_groups:\n"
            "  - age:\n    - *a\n",
            f"keys:\n- &a {ALICE}\n- &host_vps {VPS}\ncreation_rules:\n- path_regex: x$\n"
            "  key_groups:\n  - age:\n    - *a\n    - *host_vps\n",
            id="two-space-indent",
        ),
        pytest.param(
            f"keys:\r\n  - &a {ALICE}\r\ncreation_rules:\r\n  - path_regex: x$\r\n"
            "    key_groups:\r\n      - age:\r\n          - *a\r\n",
            f"keys:\r\n  - &a {ALICE}\r\n  - &host_vps {VPS}\r\ncreation_rules:\r\n"
            "  - path_regex: x$\r\n    key_groups:\r\n      - age:\r\n          - *a\r\n"
            "          - *host_vps\r\n",
            id="crlf",
        ),
        pytest.param(
            f"keys:\n  - &a {ALICE}\ncreation_rules:\n  - path_regex: x$\n    key_groups:\n"
            "      - age:\n          - *a",
            f"keys:\n  - &a {ALICE}\n  - &host_vps {VPS}\ncreation_rules:\n  - path_regex: x$\n"
            "    key_groups:\n      - age:\n          - *a\n          - *host_vps\n",
            id="no-final-newline",
        ),
        pytest.param(
            f"keys: [&a {ALICE}]\n"
            "creation_rules: [{path_regex: x$, key_groups: [{age: [*a]}]}]\n",
            f"keys: [&a {ALICE}, &host_vps {VPS}]\n"
            "creation_rules: [{path_regex: x$, key_groups: [{age: [*a, *host_vps]}]}]\n",
            id="flow-style",
        ),
        pytest.param(
            f"keys:\n  - &a {ALICE}  # alice\n\n  # hosts below\ncreation_rules:\n"
            "  - path_regex: x$\n    key_groups:\n      - age:\n          - *a   # alias comment\n"
            "          # keep me\n\n# trailing\n",
            f"keys:\n  - &a {ALICE}  # alice\n  - &host_vps {VPS}\n\n  # hosts below\n"
            "creation_rules:\n  - path_regex: x$\n    key_groups:\n      - age:\n"
            "          - *a   # alias comment\n          - *host_vps\n          # keep me\n\n"
            "# trailing\n",
            id="comments-everywhere",
        ),
        pytest.param(
            f"keys:\n  - &a {ALICE}\ncreation_rules:\n  - path_regex: x$\n    key_groups:\n"
            "      - pgp:\n          - FBC7B9E2A4F9289AC0C1D4843D16CEE4A27381B4\n",
            f"keys:\n  - &a {ALICE}\n  - &host_vps {VPS}\ncreation_rules:\n  - path_regex: x$\n"
            "    key_groups:\n      - pgp:\n          - FBC7B9E2A4F9289AC0C1D4843D16CEE4A27381B4\n"
            "        age:\n          - *host_vps\n",
            id="group-without-age",
        ),
        pytest.param(
            f"keys:\n  - &a {ALICE}\ncreation_rules:\n  - path_regex: x$\n"
            "    encrypted_regex: ^(data|stringData)$\n",
            f"keys:\n  - &a {ALICE}\n  - &host_vps {VPS}\ncreation_rules:\n  - path_regex: x$\n"
            "    encrypted_regex: ^(data|stringData)$\n    key_groups:\n      - age:\n"
            "          - *host_vps\n",
            id="rule-without-keys",
        ),
        pytest.param(
            f"creation_rules:\n  - path_regex: y$\n    age: {ALICE}\nkeys:\n  - &a {ALICE}\n",
            f"creation_rules:\n  - path_regex: y$\n    age: {ALICE}\n  - path_regex: x$\n"
            f"    key_groups:\n      - age:\n          - {VPS}\n          - {ALICE}\n"
            f"keys:\n  - &a {ALICE}\n  - &host_vps {VPS}\n",
            id="keys-after-rules-uses-literals",
        ),
        pytest.param(
            f"keys:\n  - &a {ALICE}\ncreation_rules:\n  - path_regex: x$\n    pgp:\n"
            "  # about y\n  - path_regex: y$\n    pgp:\n",
            f"keys:\n  - &a {ALICE}\n  - &host_vps {VPS}\ncreation_rules:\n  - path_regex: x$\n"
            f"    pgp:\n    age: {VPS}\n  # about y\n  - path_regex: y$\n    pgp:\n",
            id="flat-rule-with-empty-value",
        ),
        pytest.param(
            "keys: ~\ncreation_rules: []  # none yet\n",
            f"keys:\n  - &host_vps {VPS}\ncreation_rules:  # none yet\n  - path_regex: x$\n"
            "    key_groups:\n      - age:\n          - *host_vps\n",
            id="explicit-null-and-empty-flow-lists",
        ),
        pytest.param(
            f"keys:\n  - &a {ALICE}\ncreation_rules:\n  - path_regex: x$\n    age: >-\n"
            f"      {ALICE},\n      {WEB}\n  # end\n",
            f"keys:\n  - &a {ALICE}\n  - &host_vps {VPS}\ncreation_rules:\n  - path_regex: x$\n"
            f"    age: {ALICE}, {WEB}, {VPS}\n  # end\n",
            id="folded-flat-age-becomes-one-line",
        ),
    ],
)
def test_formatting_is_preserved(text: str, expected: str) -> None:
    result = enroll(text, "vps", VPS, "x$")
    assert result.text == expected
    assert "x$" in result.rules
    _assert_idempotent(result, "vps", VPS, "x$")


def test_only_lines_are_added() -> None:
    result = enroll(EXAMPLE, "vps", VPS, VPS_REGEX)
    assert _is_subsequence(EXAMPLE.splitlines(), result.text.splitlines())
    assert len(result.text.splitlines()) == len(EXAMPLE.splitlines()) + 2


def test_host_name_is_sanitized() -> None:
    assert anchor_for_host("vps-1.example.org") == "host_vps_1_example_org"
    result = enroll(EXAMPLE, "vps-1.example.org", VPS, VPS_REGEX)
    assert f"  - &host_vps_1_example_org {VPS}\n" in result.text
    assert "          - *host_vps_1_example_org\n" in result.text


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "host", "recipient", "regex", "message"),
    [
        ("keys: [\n", "vps", VPS, "x$", "not valid YAML"),
        ("keys: []\nkeys: []\n", "vps", VPS, "x$", "duplicate key"),
        ("creation_rules:\n  - age: *nope\n", "vps", VPS, "x$", "undefined alias"),
        ("a: 1\n---\nb: 2\n", "vps", VPS, "x$", "not valid YAML"),
        ("- just\n- a list\n", "vps", VPS, "x$", "must be a mapping"),
        (
            f"keys:\n  admins:\n    - &a {ALICE}\n",
            "vps", VPS, "x$", "'keys' in .sops.yaml is a mapping",
        ),
        ("keys: age1x\n", "vps", VPS, "x$", "'keys' in .sops.yaml is a string"),
        ("creation_rules: {}\n", "vps", VPS, "x$", "'creation_rules' in .sops.yaml is a mapping"),
        ("creation_rules:\n  - x$\n", "vps", VPS, "x$", "creation_rules[0] is a string"),
        (
            f"keys:\n  - &a {ALICE}\ncreation_rules:\n  - &host_vps\n    path_regex: y$\n",
            "vps", VPS, "x$", "anchor &host_vps is already used by creation_rules[0]",
        ),
        (
            "keys:\n  - &host_vps [age1x]\n",
            "vps", VPS, "x$", "keys[0] has anchor &host_vps but is a list",
        ),
        (
            f"keys:\n  - &vps_old_name {VPS}\n",
            "vps", VPS, "x$", "already in keys as &vps_old_name",
        ),
        (
            f"keys:\n  - &host_web {VPS}\n",
            "vps", VPS, "x$", "already in keys as &host_web",
        ),
        (
            "creation_rules:\n  - path_regex: x$\n    key_groups: {age: []}\n",
            "vps", VPS, "x$", "key_groups of rule 'x$' is a mapping",
        ),
        (
            "creation_rules:\n  - path_regex: x$\n    key_groups:\n      - age: age1a\n",
            "vps", VPS, "x$", "key_groups[0].age of rule 'x$' is a string",
        ),
        (EXAMPLE, "vps", "age1notarecipient", "x$", "not an age recipient"),
        (EXAMPLE, "vps", VPS.upper(), "x$", "age1"),
        (EXAMPLE, "vps", VPS, "(", "not a valid regular expression"),
        (EXAMPLE, "vps", VPS, "", "path_regex is empty"),
        (EXAMPLE, "  ", VPS, "x$", "host name is empty"),
    ],
)  # fmt: skip
def test_errors(text: str, host: str, recipient: str, regex: str, message: str) -> None:
    with pytest.raises(SopsFileError) as info:
        enroll(text, host, recipient, regex)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- refused shapes
# Rare shapes are not edited: enroll refuses with one line that says what to add by hand.

MANUAL_STEP = (
    f", a shape enroll does not edit; add the host by hand: '- &host_vps {VPS}' under keys: "
    "and '*host_vps' in the age keys of the creation rule for 'x$' (add that rule if missing), "
    "then rerun"
)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("creation_rules:\n  - path_regex: x$\n    key_groups:\n",
         "key_groups of rule 'x$' is empty"),
        ("creation_rules:\n  - path_regex: x$\n    key_groups: []\n",
         "key_groups of rule 'x$' is empty"),
        ("creation_rules:\n  - path_regex: x$\n    key_groups:\n      - {}\n",
         "key_groups[0] of rule 'x$' is a flow mapping ({...})"),
        ("creation_rules:\n  - path_regex: x$\n    key_groups:\n      - age:\n",
         "key_groups[0].age of rule 'x$' is empty"),
        ("creation_rules:\n  - path_regex: x$\n    pgp: ABC\n    age: ''\n",
         "age of rule 'x$' is empty"),
        ("creation_rules:\n  - {path_regex: x$, pgp: ABC}\n",
         "rule 'x$' is a flow mapping ({...})"),
        ("{creation_rules: []}\n", "the top level is a flow mapping ({...})"),
        (f"keys: [&a {ALICE}]\ncreation_rules: [{{path_regex: y$, age: [*a]}}]\n",
         "creation_rules is in flow style ([...])"),
    ],
)  # fmt: skip
def test_rare_shapes_are_refused_with_the_manual_step(text: str, problem: str) -> None:
    with pytest.raises(SopsFileError) as info:
        enroll(text, "vps", VPS, "x$")
    assert str(info.value) == problem + MANUAL_STEP


def test_refusal_exits_2_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through `invoke enroll` (host key read and checked stubbed out): a ConfigError, exit 2,
    one line that starts with the file's path; the file is left as it was."""
    from rebuild import enroll as enroll_task
    from rebuild.errors import ConfigError

    for name in list(os.environ):
        if name.upper().startswith("REBUILD_"):
            monkeypatch.delenv(name)
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(
        f'audit_log = "{tmp_path / "audit.jsonl"}"\n'
        '[hosts.vps]\naddress = "203.0.113.10"\nsops_path_regex = "x$"\n'
    )
    sops_yaml = tmp_path / ".sops.yaml"
    text = "creation_rules:\n  - {path_regex: x$, pgp: ABC}\n"
    sops_yaml.write_text(text)
    host_key = enroll_task.HostKey("ssh-ed25519 AAAA", "SHA256:x", VPS)
    monkeypatch.setattr(enroll_task, "host_key_gate", lambda endpoints: None)
    monkeypatch.setattr(enroll_task, "operator_gate", lambda loaded, me: "work-laptop")
    monkeypatch.setattr(enroll_task, "read_host_key", lambda endpoint: host_key.line)
    monkeypatch.setattr(enroll_task, "check_against_known_hosts", lambda ep, line: host_key)
    with pytest.raises(ConfigError) as info:
        enroll_task.run(str(inventory), "vps")
    assert info.value.exit_code == 2
    assert str(info.value) == f"{sops_yaml}: rule 'x$' is a flow mapping ({{...}})" + MANUAL_STEP
    assert sops_yaml.read_text() == text


# --------------------------------------------------------------------------- helpers


def test_sops_updatekeys_argv() -> None:
    assert sops_updatekeys_argv("secrets/vps/app.yaml") == [
        "sops",
        "updatekeys",
        "--yes",
        "secrets/vps/app.yaml",
    ]


def test_files_matching() -> None:
    paths = [
        "secrets/vps/app.yaml",
        "secrets/vps/db.env",
        "secrets/vps/nested/x.yaml",
        "secrets/vps/notes.txt",
        "secrets/common.yaml",
        "other/secrets/vps/app.json",  # re.search: not anchored at the start
    ]
    assert files_matching(paths, VPS_REGEX) == [
        "secrets/vps/app.yaml",
        "secrets/vps/db.env",
        "other/secrets/vps/app.json",
    ]
    assert files_matching(paths, COMMON_REGEX) == ["secrets/common.yaml"]
    assert files_matching(paths, "") == paths
    with pytest.raises(SopsFileError):
        files_matching(paths, "(")


def test_governing_rules_first_match_wins() -> None:
    text = EXAMPLE + "  - path_regex: secrets/.*\n    age: " + ALICE + "\n"
    assert governing_rules(
        text, ["secrets/vps/a.yaml", "secrets/common.yaml", "secrets/x.yaml", "README.md"]
    ) == {
        "secrets/vps/a.yaml": VPS_REGEX,
        "secrets/common.yaml": COMMON_REGEX,
        "secrets/x.yaml": "secrets/.*",
        "README.md": None,
    }
    assert governing_rules("", ["a"]) == {"a": None}
