"""Edit a sops ``.sops.yaml`` to enroll a host's age recipient (text in, text out).

:func:`enroll` adds the host's key to ``keys:`` under the anchor ``&host_<name>`` and an
alias to it in the creation rule for the host's secrets.  Running it again with the same
inputs changes nothing.  No IO: the caller reads and writes the file and runs ``sops
updatekeys`` (:func:`sops_updatekeys_argv`) on the secrets the returned rules cover
(:func:`files_matching`, :func:`governing_rules`).

How the file is edited
    The file is parsed with ruamel.yaml (round-trip loader, so malformed YAML,
    duplicate keys and undefined aliases are rejected), and the parser's event stream
    gives the exact source position of every node, including each ``*alias``.  The
    edits are then spliced into the original text: new lines are inserted after the
    last item of a list, with that item's own indentation, and changed scalars are
    replaced in place.  Every other byte -- comments, blank lines, quoting, flow or
    block style, comments on aliases, line endings -- is kept as it was, which a
    ruamel.yaml dump cannot guarantee (it drops comments on aliases and moves comment
    blocks that trail a list above an appended item).  The result is parsed again and
    checked before it is returned.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    DocumentStartEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

from rebuild.agekey import KeyFormatError, age_recipient_bytes

__all__ = [
    "EnrollResult",
    "SopsFileError",
    "anchor_for_host",
    "enroll",
    "files_matching",
    "governing_rules",
    "sops_updatekeys_argv",
]

HOST_ANCHOR_PREFIX = "host_"
# Flat (single key group) key sources of a creation rule besides ``age``.
_FLAT_KEY_FIELDS = ("pgp", "kms", "gcp_kms", "azure_keyvault", "hc_vault_transit_uri", "hckms")


class SopsFileError(ValueError):
    """``.sops.yaml`` cannot be edited safely; the message names the problem and the fix."""


@dataclass(frozen=True)
class EnrollResult:
    """Outcome of :func:`enroll`.

    ``text``: the new file content (the input, unchanged, when ``changed`` is false).
    ``previous_recipient``: the recipient ``&host_<name>`` had before when it differed
    (a reinstalled host); it has been replaced everywhere.
    ``rules``: ``path_regex`` of every creation rule that now includes the host, in file
    order (``""`` for a rule without ``path_regex``, which matches every file).
    """

    text: str
    changed: bool
    previous_recipient: str | None
    rules: tuple[str, ...]


def anchor_for_host(host: str) -> str:
    """The YAML anchor of a host's key entry: ``host_`` + name with [^A-Za-z0-9_] -> ``_``."""
    name = host.strip()
    if not name:
        raise SopsFileError("host name is empty; pass the inventory name of the host")
    return HOST_ANCHOR_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", name)


def sops_updatekeys_argv(secret_file: str) -> list[str]:
    """argv that re-encrypts ``secret_file``'s data key for the recipients of its rule."""
    return ["sops", "updatekeys", "--yes", secret_file]


def _compile(path_regex: str) -> re.Pattern[str]:
    try:
        return re.compile(path_regex)
    except re.error as exc:
        raise SopsFileError(
            f"path_regex {path_regex!r} is not a valid regular expression ({exc}); fix the pattern"
        ) from None


def files_matching(paths: list[str], path_regex: str) -> list[str]:
    """The repo-relative ``paths`` a creation rule's ``path_regex`` covers (``re.search``)."""
    pattern = _compile(path_regex)
    return [path for path in paths if pattern.search(path)]


def governing_rules(text: str, paths: list[str]) -> dict[str, str | None]:
    """Map each path to the ``path_regex`` of the creation rule sops uses for it -- the
    first rule that matches (``""`` for a rule without ``path_regex``) -- or ``None``.

    ``sops updatekeys`` re-keys a file for that rule only, so a file whose governing rule
    is not in :attr:`EnrollResult.rules` does not gain the host even if another rule's
    regex matches it.
    """
    doc = _Doc.parse(text)
    patterns = [(regex, _compile(regex)) for regex in (_rule_regex(r) for r in doc.rules())]
    return {
        path: next((regex for regex, pattern in patterns if pattern.search(path)), None)
        for path in paths
    }


# --------------------------------------------------------------------------- YAML model


@dataclass(eq=False)
class _Node:
    """A YAML node with its source span (character offsets into the text)."""

    kind: str  # "map" | "seq" | "scalar" | "alias"
    start: int
    end: int
    anchor: str | None = None  # for "alias": the name it refers to
    value: str = ""
    style: str | None = None  # scalar quoting style: None (plain), "'", '"', "|", ">"
    flow: bool = False
    items: list[_Node] = field(default_factory=list)
    pairs: list[tuple[_Node, _Node]] = field(default_factory=list)
    target: _Node | None = None  # for "alias": the anchored node

    def resolved(self) -> _Node:
        return self.target if self.kind == "alias" and self.target is not None else self

    def get(self, key: str) -> _Node | None:
        pair = self.pair(key)
        return pair[1].resolved() if pair else None

    def pair(self, key: str) -> tuple[_Node, _Node] | None:
        for key_node, value_node in self.pairs:
            if key_node.kind == "scalar" and key_node.value == key:
                return key_node, value_node
        return None

    def has(self, key: str) -> bool:
        return self.pair(key) is not None

    @property
    def is_null(self) -> bool:
        return (
            self.kind == "scalar"
            and self.style is None
            and self.value in ("", "~", "null", "Null", "NULL")
        )


def _kind(node: _Node | None) -> str:
    if node is None or node.is_null:
        return "null"
    return {"map": "mapping", "seq": "list", "scalar": "string"}.get(node.kind, node.kind)


class _TreeBuilder:
    """Builds :class:`_Node` trees from ruamel.yaml parser events."""

    def __init__(self, events: Iterator[Any]) -> None:
        self._events = events
        self._anchors: dict[str, _Node] = {}

    def document(self) -> _Node | None:
        for event in self._events:
            if isinstance(event, DocumentStartEvent):
                return self._node(next(self._events))
            if isinstance(event, StreamEndEvent):
                break
        return None

    def _node(self, event: Any) -> _Node:
        start, end = event.start_mark.index, event.end_mark.index
        if isinstance(event, AliasEvent):
            return _Node("alias", start, end, event.anchor, target=self._anchors.get(event.anchor))
        if isinstance(event, ScalarEvent):
            node = _Node("scalar", start, end, event.anchor, event.value, event.style)
        elif isinstance(event, SequenceStartEvent | MappingStartEvent):
            kind = "seq" if isinstance(event, SequenceStartEvent) else "map"
            node = _Node(kind, start, end, event.anchor, flow=bool(event.flow_style))
            while not isinstance(child := next(self._events), CollectionEndEvent):
                if kind == "seq":
                    node.items.append(self._node(child))
                else:
                    key = self._node(child)
                    node.pairs.append((key, self._node(next(self._events))))
            node.end = child.end_mark.index
        else:  # pragma: no cover - the parser emits nothing else inside a document
            raise SopsFileError(f"unexpected YAML event {type(event).__name__}")
        if node.anchor:
            self._anchors[node.anchor] = node
        return node


def _yaml_error(exc: YAMLError) -> SopsFileError:
    if isinstance(exc, MarkedYAMLError):
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark is not None else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
    else:
        where, problem = "", " ".join(str(exc).split())
    return SopsFileError(f".sops.yaml is not valid YAML ({problem}{where}); fix it and rerun")


@dataclass(frozen=True)
class _Layout:
    """Block indentation: a list's dash sits ``offset`` columns right of its parent key,
    its items ``sequence`` columns right of it."""

    offset: int = 2
    sequence: int = 4

    def item_prefix(self, key_col: int) -> str:
        return " " * (key_col + self.offset) + "-" + " " * (self.sequence - self.offset - 1)


def _guess_layout(text: str) -> _Layout:
    """Indentation of the first block list under a key (sops' documented style if none)."""
    key_indent: int | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if stripped.startswith("- ") and key_indent is not None:
            rest = stripped[2:].lstrip(" ")
            offset, sequence = indent - key_indent, len(line) - len(rest) - key_indent
            if rest and offset >= 0 and sequence >= offset + 2:
                return _Layout(offset, sequence)
            return _Layout()
        key_indent = indent if stripped.endswith(":") else None
    return _Layout()


class _Doc:
    """Parsed ``.sops.yaml`` text plus the helpers that find and edit its parts."""

    def __init__(self, text: str, root: _Node | None) -> None:
        self.newline = "\r\n" if "\r\n" in text else "\n"
        # Edits insert whole lines; give the last line its line break first.
        self.text = text if not text or text.endswith("\n") else text + self.newline
        self.root = root
        self.layout = _guess_layout(text)
        self.edits: list[tuple[int, int, str]] = []

    @classmethod
    def parse(cls, text: str) -> _Doc:
        try:
            YAML(typ="rt").load(text)  # rejects duplicate keys, undefined aliases, ...
            root = _TreeBuilder(iter(YAML(typ="safe", pure=True).parse(text))).document()
        except YAMLError as exc:
            raise _yaml_error(exc) from None
        if root is not None and root.is_null:
            root = None
        if root is not None and root.kind != "map":
            raise SopsFileError(
                f".sops.yaml must be a mapping with 'keys' and 'creation_rules', found a "
                f"{_kind(root)}; fix the top level of the file"
            )
        return cls(text, root)

    # ---------------------------------------------------------------- queries

    def keys(self) -> _Node | None:
        if self.root is None:
            return None
        keys = self.root.get("keys")
        if keys is not None and not keys.is_null and keys.kind != "seq":
            raise SopsFileError(
                f"'keys' in .sops.yaml is a {_kind(keys)}, expected a list of "
                "'- &anchor age1...' entries; restructure it as a list"
            )
        return keys

    def rules_node(self) -> _Node | None:
        if self.root is None:
            return None
        rules = self.root.get("creation_rules")
        if rules is not None and not rules.is_null and rules.kind != "seq":
            raise SopsFileError(
                f"'creation_rules' in .sops.yaml is a {_kind(rules)}, expected a list of "
                "rules; restructure it as a list"
            )
        return rules

    def rules(self) -> list[_Node]:
        rules = self.rules_node()
        out: list[_Node] = []
        for index, item in enumerate(rules.items if rules is not None else []):
            rule = item.resolved()
            if rule.kind != "map":
                raise SopsFileError(
                    f"creation_rules[{index}] is a {_kind(rule)}, expected a mapping with "
                    "path_regex and keys; fix that entry"
                )
            out.append(rule)
        return out

    # ---------------------------------------------------------------- text helpers

    def line_start(self, index: int) -> int:
        return self.text.rfind("\n", 0, index) + 1

    def line_after(self, index: int) -> int:
        """Offset just past the line break of the line holding ``index``."""
        newline = self.text.find("\n", index)
        return len(self.text) if newline < 0 else newline + 1

    def content_end(self, node: _Node) -> int:
        """Offset just past the last character of ``node``'s own text."""
        if node.kind in ("scalar", "alias") or node.flow:
            return node.end
        if node.kind == "seq" and node.items:
            return self.content_end(node.items[-1])
        if node.kind == "map" and node.pairs:
            key, value = node.pairs[-1]
            if value.kind == "scalar" and value.start == value.end:
                # An empty value is "positioned" at the next token, possibly lines below.
                return self.content_end(key)
            return self.content_end(value)
        return node.end

    def column(self, index: int) -> int:
        return index - self.line_start(index)

    def edit(self, start: int, end: int, replacement: str) -> None:
        self.edits.append((start, end, replacement))

    def insert_lines(self, index: int, lines: list[str]) -> None:
        """Insert whole lines at ``index`` (a line start, or the end of the text)."""
        self.edit(index, index, "".join(line + self.newline for line in lines))

    def result(self) -> str:
        """The text with all edits applied; edits at one offset keep their queue order."""
        text = self.text
        queued = sorted(enumerate(self.edits), key=lambda e: (e[1][0], e[0]), reverse=True)
        for _, (start, end, replacement) in queued:
            text = text[:start] + replacement + text[end:]
        return text

    # ---------------------------------------------------------------- edits

    def append_item(self, seq: _Node, lines: list[str], flow_text: str) -> None:
        """Append an item to a list: ``lines`` (first line without its dash prefix, the
        rest indented relative to the item's column) for block lists, ``flow_text`` for
        ``[...]`` lists."""
        if seq.flow:
            if seq.items:
                self.edit(seq.items[-1].end, seq.items[-1].end, ", " + flow_text)
            else:
                close = self.text.rfind("]", seq.start, seq.end)
                self.edit(close, close, flow_text)
            return
        last = seq.items[-1]
        line_start = self.line_start(last.start)
        prefix = self.text[line_start : last.start]
        if prefix.strip() != "-":
            dash = self.text.rfind("-", line_start, last.start)
            prefix = " " * self.column(dash) + "- "
        indent = " " * len(prefix)
        body = [prefix + lines[0]] + [indent + line for line in lines[1:]]
        self.insert_lines(self.line_after(self.content_end(last) - 1), body)

    def set_empty_value(self, key: _Node, value: _Node, lines: list[str], inline: str) -> None:
        """Give a key whose value is null a block value (``lines``, indented relative to
        the key's column) or, with no ``lines`` or inside a flow mapping, ``inline``."""
        explicit = value.end > value.start  # ``~`` or ``null`` written out
        if lines and not self._in_flow(key):
            if explicit:
                self.edit(value.start, value.end, "")
            key_col = self.column(key.start)
            colon = self.text.find(":", key.end)
            self.insert_lines(self.line_after(colon), [" " * key_col + ln for ln in lines])
        elif explicit:
            self.edit(value.start, value.end, inline)
        else:
            colon = self.text.find(":", key.end)
            self.edit(colon + 1, colon + 1, " " + inline)

    def add_key(self, mapping: _Node, key: str, lines: list[str], inline: str) -> None:
        """Add ``key`` to a mapping: block ``key: ...`` lines (relative to the mapping's
        key column) or ``key: inline`` in a flow mapping."""
        if mapping.flow:
            close = self.text.rfind("}", mapping.start, mapping.end)
            sep = ", " if mapping.pairs else ""
            self.edit(close, close, f"{sep}{key}: {inline}")
            return
        key_col = self.column(mapping.pairs[0][0].start)
        body = [" " * key_col + lines[0]] + [" " * key_col + line for line in lines[1:]]
        self.insert_lines(self.line_after(self.content_end(mapping) - 1), body)

    def replace_scalar(self, node: _Node, value: str) -> None:
        """Replace a scalar's value, keeping its anchor and quoting where possible."""
        span = self.text[node.start : node.end]
        quote = node.style if node.style in ("'", '"') else ""
        old = f"{quote}{node.value}{quote}"
        if node.style in (None, "'", '"') and "\n" not in span and span.endswith(old):
            start = node.end - len(old)
            self.edit(start, node.end, f"{quote}{value}{quote}")
            return
        # Multi-line or block scalar: rewrite it as one plain line.
        anchor = f"&{node.anchor} " if node.anchor else ""
        trailing = self.newline if node.style in ("|", ">") else ""
        self.edit(node.start, node.end, anchor + _plain_or_quoted(value) + trailing)

    def _in_flow(self, key: _Node) -> bool:
        def find(node: _Node, inside_flow: bool) -> bool | None:
            if node is key:
                return inside_flow
            children: list[_Node] = list(node.items)
            for pair in node.pairs:
                children.extend(pair)
            for child in children:
                if child.kind == "alias":
                    continue
                found = find(child, inside_flow or node.flow)
                if found is not None:
                    return found
            return None

        return bool(self.root and find(self.root, False))


def _plain_or_quoted(value: str) -> str:
    """``value`` as a one-line YAML scalar (plain when that is safe)."""
    yaml = YAML(typ="rt")
    yaml.width = 1 << 16
    stream = io.StringIO()
    yaml.dump({"k": value}, stream)
    return stream.getvalue()[len("k: ") :].rstrip("\n")


# --------------------------------------------------------------------------- rule logic


def _rule_regex(rule: _Node) -> str:
    regex = rule.get("path_regex")
    return regex.value if regex is not None and regex.kind == "scalar" else ""


def _rule_name(rule: _Node) -> str:
    regex = rule.get("path_regex")
    return f"rule {regex.value!r}" if regex is not None else "rule without path_regex"


def _split_flat(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _scalar_values(seq: _Node) -> list[str]:
    return [item.resolved().value for item in seq.items if item.resolved().kind == "scalar"]


def _rule_recipients(rule: _Node) -> list[str]:
    out: list[str] = []
    groups = rule.get("key_groups")
    if groups is not None and groups.kind == "seq":
        for group in (g.resolved() for g in groups.items):
            age = group.get("age") if group.kind == "map" else None
            if age is not None and age.kind == "seq":
                out.extend(_scalar_values(age))
    flat = rule.get("age")
    if flat is not None and flat.kind == "scalar":
        out.extend(_split_flat(flat.value))
    elif flat is not None and flat.kind == "seq":
        out.extend(_scalar_values(flat))
    return out


def _age_block(layout: _Layout, items: list[str]) -> list[str]:
    """``age:`` with a block list, relative to the key's column."""
    return ["age:"] + [layout.item_prefix(0) + item for item in items]


def _key_groups_block(layout: _Layout, items: list[str]) -> list[str]:
    """``key_groups: [{age: items}]`` in block style, relative to the key's column."""
    group_col = layout.sequence  # column of ``age:`` inside the group item
    lines = ["key_groups:", layout.item_prefix(0) + "age:"]
    lines += [layout.item_prefix(group_col) + item for item in items]
    return lines


def _flow_key_groups(items: list[str]) -> str:
    return "[{age: [" + ", ".join(items) + "]}]"


def _add_to_rule(doc: _Doc, rule: _Node, alias: str, recipient: str) -> None:
    """Add the host to an existing rule that does not include it yet."""
    name = _rule_name(rule)
    layout = doc.layout
    groups_pair = rule.pair("key_groups")
    if groups_pair is not None:
        groups_key, groups = groups_pair[0], groups_pair[1].resolved()
        if groups.is_null:
            doc.set_empty_value(
                groups_key,
                groups,
                _key_groups_block(layout, [alias])[1:],
                _flow_key_groups([alias]),
            )
            return
        if groups.kind != "seq":
            raise SopsFileError(
                f"key_groups of {name} is a {_kind(groups)}, expected a list; fix that rule"
            )
        if not groups.items:
            doc.append_item(groups, [], "{age: [" + alias + "]}")
            return
        group = groups.items[0].resolved()
        if group.kind != "map":
            raise SopsFileError(
                f"key_groups[0] of {name} is a {_kind(group)}, expected a mapping like "
                "'age: [...]'; fix that rule"
            )
        age_pair = group.pair("age")
        if age_pair is None:
            if not group.pairs:
                close = doc.text.rfind("}", group.start, group.end)
                doc.edit(close, close, f"age: [{alias}]")
            else:
                doc.add_key(group, "age", _age_block(layout, [alias]), f"[{alias}]")
            return
        age_key, age = age_pair[0], age_pair[1].resolved()
        if age.is_null:
            doc.set_empty_value(age_key, age, _age_block(layout, [alias])[1:], f"[{alias}]")
        elif age.kind == "seq":
            doc.append_item(age, [alias], alias)
        else:
            raise SopsFileError(
                f"key_groups[0].age of {name} is a {_kind(age)}, expected a list of "
                "recipients; fix that rule"
            )
        return
    flat_pair = rule.pair("age")
    if flat_pair is not None:
        flat_key, flat = flat_pair[0], flat_pair[1].resolved()
        if flat.is_null or (flat.kind == "scalar" and not flat.value.strip()):
            if flat.is_null:
                doc.set_empty_value(flat_key, flat, [], recipient)
            else:
                doc.replace_scalar(flat, recipient)
        elif flat.kind == "scalar":
            separator = ", " if ", " in flat.value else ","
            doc.replace_scalar(flat, flat.value.rstrip().rstrip(",") + separator + recipient)
        elif flat.kind == "seq":
            doc.append_item(flat, [alias], alias)
        else:
            raise SopsFileError(
                f"age of {name} is a {_kind(flat)}, expected a comma-separated string or a "
                "list; fix that rule"
            )
        return
    if any(rule.has(key) for key in _FLAT_KEY_FIELDS):
        doc.add_key(rule, "age", [f"age: {recipient}"], recipient)  # joins the flat group
        return
    if not rule.pairs:  # ``{}``
        close = doc.text.rfind("}", rule.start, rule.end)
        doc.edit(close, close, f"key_groups: {_flow_key_groups([alias])}")
        return
    doc.add_key(rule, "key_groups", _key_groups_block(layout, [alias]), _flow_key_groups([alias]))


def _new_rule(
    doc: _Doc,
    root: _Node,
    rules_key: _Node | None,
    rules: _Node | None,
    items: list[str],
    path_regex: str,
) -> None:
    layout = doc.layout
    regex = _plain_or_quoted(path_regex)
    block = [f"path_regex: {regex}"]
    block += _key_groups_block(layout, items)
    flow = "{path_regex: " + regex + ", key_groups: " + _flow_key_groups(items) + "}"
    if rules is not None and not rules.is_null:  # a flow list or a block list with items
        doc.append_item(rules, block, flow)
        return
    prefix = layout.item_prefix(0)
    indent = " " * len(prefix)
    lines = [prefix + block[0]] + [indent + line for line in block[1:]]
    if rules_key is not None and rules is not None:
        doc.set_empty_value(rules_key, rules, lines, "[" + flow + "]")
        return
    if root.flow or not root.pairs:
        doc.add_key(root, "creation_rules", [], "[" + flow + "]")
    else:
        key_col = doc.column(root.pairs[0][0].start)
        doc.insert_lines(
            doc.line_after(doc.content_end(root) - 1),
            [" " * key_col + "creation_rules:"] + [" " * key_col + line for line in lines],
        )


def _new_document(anchor: str, recipient: str, path_regex: str, newline: str) -> str:
    layout = _Layout()
    prefix = layout.item_prefix(0)
    indent = " " * len(prefix)
    rule = [f"path_regex: {_plain_or_quoted(path_regex)}"]
    rule += _key_groups_block(layout, [f"*{anchor}"])
    lines = ["keys:", f"{prefix}&{anchor} {recipient}", "creation_rules:"]
    lines += [prefix + rule[0]] + [indent + line for line in rule[1:]]
    return "".join(line + newline for line in lines)


# --------------------------------------------------------------------------- enroll


def enroll(text: str, host: str, recipient: str, path_regex: str) -> EnrollResult:
    """Enroll ``host``'s age ``recipient`` in a ``.sops.yaml`` for secrets at ``path_regex``.

    * ``keys:`` gets ``- &host_<name> <recipient>`` (the list is created if absent); an
      existing ``&host_<name>`` with another recipient is replaced (reinstalled host),
      also where it is written out literally in rules, and reported in
      ``previous_recipient``.
    * The first creation rule whose ``path_regex`` equals ``path_regex`` gets
      ``*host_<name>`` in the ``age`` list of its first key group (or the recipient
      appended to a flat ``age: age1a,age1b`` string); with no such rule one is appended
      with the host and every admin key (anchors not starting with ``host_``).

    Raises :class:`SopsFileError` on malformed input or ambiguous key entries.
    """
    anchor = anchor_for_host(host)
    try:
        age_recipient_bytes(recipient)
    except KeyFormatError as exc:
        raise SopsFileError(f"{exc}; pass the host's age1... recipient") from None
    if not path_regex or "\n" in path_regex or "\r" in path_regex:
        raise SopsFileError(
            "path_regex is empty or spans lines; pass the one-line regex of the host's secrets"
        )
    _compile(path_regex)

    doc = _Doc.parse(text)
    if doc.root is None:
        header = text.strip("\r\n")
        body = _new_document(anchor, recipient, path_regex, doc.newline)
        new_text = header + doc.newline + body if header.strip() else body
        return EnrollResult(new_text, True, None, (path_regex,))

    previous = _plan(doc, doc.root, anchor, recipient, path_regex)
    if not doc.edits:
        covered = _covered(doc, recipient)
        return EnrollResult(text, False, None, covered)
    new_text = doc.result()
    try:
        check = _Doc.parse(new_text)
    except SopsFileError as exc:  # pragma: no cover - guards against a bug in the editing code
        raise SopsFileError(
            f"could not edit .sops.yaml safely (the edit would break it: {exc}); add the key by "
            "hand and report this"
        ) from None
    if (
        check.root is None
        or _plan(check, check.root, anchor, recipient, path_regex) is not None
        or check.edits
    ):
        raise SopsFileError(  # pragma: no cover - guards against a bug in the editing code
            "could not edit .sops.yaml safely (the edited file does not include the host); "
            "add the key by hand and report this"
        )
    return EnrollResult(new_text, True, previous, _covered(check, recipient))


def _covered(doc: _Doc, recipient: str) -> tuple[str, ...]:
    return tuple(_rule_regex(r) for r in doc.rules() if recipient in _rule_recipients(r))


def _plan(doc: _Doc, root: _Node, anchor: str, recipient: str, path_regex: str) -> str | None:
    """Queue the edits on ``doc``; return the previous recipient if it is replaced."""
    keys = doc.keys()
    entry = f"&{anchor} {recipient}"
    # An alias must come after its anchor; if ``keys:`` follows ``creation_rules:``,
    # rules get the recipients written out instead.
    keys_pair, rules_pair = root.pair("keys"), root.pair("creation_rules")
    use_aliases = not (keys_pair and rules_pair and keys_pair[0].start > rules_pair[0].start)
    alias = f"*{anchor}" if use_aliases else recipient

    host_entry: _Node | None = None
    admins: list[str] = []
    for index, item in enumerate(keys.items if keys is not None else []):
        if item.kind == "alias":
            continue
        if item.anchor == anchor:
            if item.kind != "scalar":
                raise SopsFileError(
                    f"keys[{index}] has anchor &{anchor} but is a {_kind(item)}, not an age "
                    f"recipient; rename that anchor or make it '- &{anchor} age1...'"
                )
            host_entry = item
        elif item.kind == "scalar" and item.value == recipient:
            label = f"&{item.anchor}" if item.anchor else "an entry without an anchor"
            raise SopsFileError(
                f"recipient {recipient} is already in keys as {label}; rename it to "
                f"&{anchor} (and its aliases) so the host has one entry"
            )
        elif (
            item.kind == "scalar" and item.anchor and not item.anchor.startswith(HOST_ANCHOR_PREFIX)
        ):
            admins.append(f"*{item.anchor}" if use_aliases else _plain_or_quoted(item.value))
    for path, node in _walk(root):
        if node.kind != "alias" and node.anchor == anchor and node is not host_entry:
            raise SopsFileError(
                f"anchor &{anchor} is already used by {path or 'the document'}, not by an "
                "entry of keys; rename that anchor"
            )

    # The key entry.
    previous: str | None = None
    if host_entry is not None and host_entry.value != recipient:
        previous = host_entry.value
        doc.replace_scalar(host_entry, recipient)
        _replace_literals(doc, previous, recipient)
    elif host_entry is None:
        layout = doc.layout
        if keys is not None and not keys.is_null:
            doc.append_item(keys, [entry], entry)
        elif keys_pair is not None:
            doc.set_empty_value(
                keys_pair[0], keys_pair[1], [layout.item_prefix(0) + entry], f"[{entry}]"
            )
        elif root.flow:
            doc.edit(root.start + 1, root.start + 1, f"keys: [{entry}], ")
        else:
            first_key = root.pairs[0][0]
            key_col = doc.column(first_key.start)
            doc.insert_lines(
                doc.line_start(first_key.start),
                [" " * key_col + "keys:", " " * key_col + layout.item_prefix(0) + entry],
            )

    # The creation rule.
    rules = doc.rules()
    target = next((r for r in rules if r.has("path_regex") and _rule_regex(r) == path_regex), None)
    if target is None:
        _new_rule(
            doc,
            root,
            rules_pair[0] if rules_pair else None,
            doc.rules_node(),
            [alias, *admins],
            path_regex,
        )
    elif recipient not in _rule_recipients(target) and (
        previous is None or previous not in _rule_recipients(target)
    ):
        _add_to_rule(doc, target, alias, recipient)
    return previous


def _replace_literals(doc: _Doc, old: str, new: str) -> None:
    """Rewrite literal copies of the old recipient in creation rules (aliases follow the
    anchor by themselves)."""
    pattern = re.compile(rf"(?<![0-9a-z]){re.escape(old)}(?![0-9a-z])")
    for rule in doc.rules():
        for _, node in _walk(rule):
            if node.kind == "seq":
                for item in node.items:
                    if item.kind == "scalar" and item.value == old:
                        doc.replace_scalar(item, new)
        flat = rule.get("age")
        if flat is not None and flat.kind == "scalar" and old in _split_flat(flat.value):
            doc.replace_scalar(flat, pattern.sub(new, flat.value))


def _walk(node: _Node, path: str = "") -> Iterator[tuple[str, _Node]]:
    yield path, node
    for index, item in enumerate(node.items):
        if item.kind != "alias":
            yield from _walk(item, f"{path}[{index}]")
    for key, value in node.pairs:
        if value.kind != "alias":
            label = key.value if key.kind == "scalar" else "?"
            yield from _walk(value, f"{path}.{label}" if path else label)
