"""Edit a sops ``.sops.yaml`` to enroll a host's age recipient (text in, text out).

:func:`enroll` adds the host's key to ``keys:`` under the anchor ``&host_<name>`` and an
alias to it in the creation rule for the host's secrets; running it again changes nothing.
No IO: the caller reads and writes the file and runs ``sops updatekeys``
(:func:`sops_updatekeys_argv`) on the secrets the rules cover (:func:`governing_rules`).

How the file is edited
    ruamel.yaml parses the file (the round-trip loader rejects malformed YAML, duplicate
    keys and undefined aliases) and its event stream gives the source span of every node,
    each ``*alias`` included.  The edits are spliced into the original text: a new list
    item goes on the line after the last item, with that item's own dash prefix; a changed
    scalar is replaced in place.  Every other byte (comments, blank lines, quoting, line
    endings, comments on aliases) stays, which a round-trip dump cannot promise (it drops
    comments on aliases and moves a comment block that trails a list above an appended
    item).  The result is parsed and checked again before it is returned.

Shapes
    The shapes the sops documentation shows are edited: block lists and mappings, flow
    lists (``[a, b]``), ``key_groups`` with an ``age`` list, a flat ``age`` string or
    list, missing or empty ``keys``/``creation_rules``.  Where the host would have to go
    into a flow mapping (``{...}``), a flow ``creation_rules`` list, or an empty
    ``key_groups``/``age`` of a rule, :func:`enroll` refuses with one line that says what
    to add by hand.
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


class _Unsupported(Exception):
    """A valid shape that :func:`enroll` does not edit; it becomes a :class:`SopsFileError`
    that names what to add by hand."""


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
    patterns = [(regex, _compile(regex)) for regex in map(_rule_regex, _Doc.parse(text).rules())]
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
        return self.target or self

    def pair(self, key: str) -> tuple[_Node, _Node] | None:
        """``(key node, resolved value node)`` of ``key`` in a mapping."""
        for key_node, value in self.pairs:
            if key_node.kind == "scalar" and key_node.value == key:
                return key_node, value.resolved()
        return None

    def get(self, key: str) -> _Node | None:
        pair = self.pair(key)
        return pair[1] if pair else None

    @property
    def is_null(self) -> bool:
        nulls = ("", "~", "null", "Null", "NULL")
        return self.kind == "scalar" and self.style is None and self.value in nulls


def _kind(node: _Node) -> str:
    if node.is_null:
        return "null"
    return {"map": "mapping", "seq": "list", "scalar": "string"}.get(node.kind, node.kind)


def _tree(events: Iterator[Any]) -> _Node | None:
    """The document's root :class:`_Node`, built from ruamel.yaml parser events."""
    anchors: dict[str, _Node] = {}

    def node(event: Any) -> _Node:
        start, end = event.start_mark.index, event.end_mark.index
        if isinstance(event, AliasEvent):
            return _Node("alias", start, end, event.anchor, target=anchors.get(event.anchor))
        if isinstance(event, ScalarEvent):
            new = _Node("scalar", start, end, event.anchor, event.value, event.style)
        else:
            kind = "seq" if isinstance(event, SequenceStartEvent) else "map"
            new = _Node(kind, start, end, event.anchor, flow=bool(event.flow_style))
            while not isinstance(child := next(events), CollectionEndEvent):
                if kind == "seq":
                    new.items.append(node(child))
                else:
                    new.pairs.append((node(child), node(next(events))))
            new.end = child.end_mark.index
        if new.anchor:
            anchors[new.anchor] = new
        return new

    for event in events:
        if isinstance(event, DocumentStartEvent):
            return node(next(events))
        if isinstance(event, StreamEndEvent):
            break
    return None


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


class _Doc:
    """Parsed ``.sops.yaml`` text, its queries, and the edits queued on it."""

    def __init__(self, text: str, root: _Node | None) -> None:
        self.newline = "\r\n" if "\r\n" in text else "\n"
        # Edits insert whole lines; give the last line its line break first.
        self.text = text if not text or text.endswith("\n") else text + self.newline
        self.root = root
        self.edits: list[tuple[int, int, str]] = []
        self.layout = _Layout()  # sops' documented style, unless the file has block lists:
        for key, value in root.pairs if root is not None else []:
            first = value.items[0] if value.kind == "seq" and value.items else None
            dash = -1 if first is None else self.text.rfind("-", 0, first.start)
            if first is not None and not value.flow and dash >= self.line_start(first.start):
                col = self.column(key.start)
                self.layout = _Layout(self.column(dash) - col, self.column(first.start) - col)
                break

    @classmethod
    def parse(cls, text: str) -> _Doc:
        try:
            YAML(typ="rt").load(text)  # rejects duplicate keys, undefined aliases, ...
            root = _tree(iter(YAML(typ="safe", pure=True).parse(text)))
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

    def top_list(self, key: str, of: str) -> _Node | None:
        """The top-level ``key`` (``keys`` or ``creation_rules``): a list, null or None."""
        node = self.root.get(key) if self.root is not None else None
        if node is not None and not node.is_null and node.kind != "seq":
            raise SopsFileError(
                f"'{key}' in .sops.yaml is a {_kind(node)}, expected a list of {of}; "
                "restructure it as a list"
            )
        return node

    def rules(self) -> list[_Node]:
        rules = self.top_list("creation_rules", "rules")
        out = [item.resolved() for item in (rules.items if rules is not None else [])]
        for index, rule in enumerate(out):
            if rule.kind != "map":
                raise SopsFileError(
                    f"creation_rules[{index}] is a {_kind(rule)}, expected a mapping with "
                    "path_regex and keys; fix that entry"
                )
        return out

    # ---------------------------------------------------------------- text positions

    def line_start(self, index: int) -> int:
        return self.text.rfind("\n", 0, index) + 1

    def line_after(self, index: int) -> int:
        """Offset just past the line break of the line holding ``index``."""
        newline = self.text.find("\n", index)
        return len(self.text) if newline < 0 else newline + 1

    def column(self, index: int) -> int:
        return index - self.line_start(index)

    def content_end(self, node: _Node) -> int:
        """Offset just past the last character of ``node``'s own text (a block
        collection's end mark lies at the next token, after trailing comments)."""
        if node.kind in ("scalar", "alias") or node.flow:
            return node.end
        if node.kind == "seq" and node.items:
            return self.content_end(node.items[-1])
        if node.kind == "map" and node.pairs:
            key, value = node.pairs[-1]
            # An empty value is "positioned" at the next token, possibly lines below.
            empty = value.kind == "scalar" and value.start == value.end
            return self.content_end(key if empty else value)
        return node.end

    # ---------------------------------------------------------------- edits

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

    def append_item(self, seq: _Node, lines: list[str]) -> None:
        """Append an item to a list: ``lines`` (the first without its dash, the rest
        relative to the item's column); a flow list takes one-line items only."""
        if seq.flow:
            at = seq.items[-1].end if seq.items else self.text.rfind("]", seq.start, seq.end)
            self.edit(at, at, (", " if seq.items else "") + lines[0])
            return
        last = seq.items[-1]
        line_start = self.line_start(last.start)
        prefix = self.text[line_start : last.start]
        if prefix.strip() != "-":
            prefix = " " * self.column(self.text.rfind("-", line_start, last.start)) + "- "
        body = [prefix + lines[0]] + [" " * len(prefix) + line for line in lines[1:]]
        self.insert_lines(self.line_after(self.content_end(last) - 1), body)

    def fill(self, key: _Node, value: _Node, lines: list[str]) -> None:
        """Give a block key whose value is null or ``[]`` the block ``lines`` (relative to
        the key's column)."""
        colon = self.text.find(":", key.end)
        if value.end > value.start:  # ``~``, ``null`` or ``[]`` written out
            self.edit(colon + 1, value.end, "")
        self.insert_lines(
            self.line_after(colon), [" " * self.column(key.start) + ln for ln in lines]
        )

    def add_key(self, mapping: _Node, lines: list[str], where: str) -> None:
        """Add ``key: ...`` block ``lines`` (relative to the keys' column) to a mapping."""
        if mapping.flow:
            raise _Unsupported(f"{where} is a flow mapping ({{...}})")
        key_col = self.column(mapping.pairs[0][0].start)
        body = [" " * key_col + line for line in lines]
        self.insert_lines(self.line_after(self.content_end(mapping) - 1), body)

    def replace_scalar(self, node: _Node, value: str) -> None:
        """Replace a scalar's value, keeping its anchor and quoting where possible."""
        span = self.text[node.start : node.end]
        quote = node.style if node.style in ("'", '"') else ""
        old = f"{quote}{node.value}{quote}"
        if node.style in (None, "'", '"') and "\n" not in span and span.endswith(old):
            self.edit(node.end - len(old), node.end, f"{quote}{value}{quote}")
            return
        # Multi-line or block scalar: rewrite it as one plain line.
        anchor = f"&{node.anchor} " if node.anchor else ""
        trailing = self.newline if node.style in ("|", ">") else ""
        self.edit(node.start, node.end, anchor + _plain_or_quoted(value) + trailing)


def _plain_or_quoted(value: str) -> str:
    """``value`` as a one-line YAML scalar (plain when that is safe)."""
    yaml = YAML(typ="rt")
    yaml.width = 1 << 16
    stream = io.StringIO()
    yaml.dump({"k": value}, stream)
    return stream.getvalue()[len("k: ") :].rstrip("\n")


def _walk(node: _Node, path: str = "") -> Iterator[tuple[str, _Node]]:
    """Every node below ``node`` (aliases not followed), with its path for messages."""
    yield path, node
    for index, item in enumerate(node.items):
        if item.kind != "alias":
            yield from _walk(item, f"{path}[{index}]")
    for key, value in node.pairs:
        if value.kind != "alias":
            label = key.value if key.kind == "scalar" else "?"
            yield from _walk(value, f"{path}.{label}" if path else label)


# --------------------------------------------------------------------------- rule logic


def _rule_regex(rule: _Node) -> str:
    regex = rule.get("path_regex")
    return regex.value if regex is not None and regex.kind == "scalar" else ""


def _rule_name(rule: _Node) -> str:
    regex = rule.get("path_regex")
    return f"rule {regex.value!r}" if regex is not None else "rule without path_regex"


def _split_flat(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _rule_recipients(rule: _Node) -> list[str]:
    lists: list[_Node | None] = [rule.get("age")]
    groups = rule.get("key_groups")
    if groups is not None and groups.kind == "seq":
        lists += [g.resolved().get("age") for g in groups.items if g.resolved().kind == "map"]
    out: list[str] = []
    for node in lists:
        if node is not None and node.kind == "seq":
            out += [i.resolved().value for i in node.items if i.resolved().kind == "scalar"]
        elif node is not None and node.kind == "scalar":
            out += _split_flat(node.value)
    return out


def _key_groups_block(layout: _Layout, items: list[str]) -> list[str]:
    """``key_groups: [{age: items}]`` in block style, relative to the key's column."""
    group_col = layout.sequence  # column of ``age:`` inside the group item
    lines = ["key_groups:", layout.item_prefix(0) + "age:"]
    return lines + [layout.item_prefix(group_col) + item for item in items]


def _add_to_rule(doc: _Doc, rule: _Node, alias: str, recipient: str) -> None:
    """Add the host to an existing rule that does not include it yet."""
    name = _rule_name(rule)
    groups = rule.get("key_groups")
    if groups is not None:
        if groups.kind != "seq" and not groups.is_null:
            raise SopsFileError(
                f"key_groups of {name} is a {_kind(groups)}, expected a list; fix that rule"
            )
        if groups.is_null or not groups.items:
            raise _Unsupported(f"key_groups of {name} is empty")
        group = groups.items[0].resolved()
        if group.kind != "map":
            raise SopsFileError(
                f"key_groups[0] of {name} is a {_kind(group)}, expected a mapping like "
                "'age: [...]'; fix that rule"
            )
        age = group.get("age")
        if age is None:
            block = ["age:", doc.layout.item_prefix(0) + alias]
            doc.add_key(group, block, f"key_groups[0] of {name}")
        elif age.kind == "seq":
            doc.append_item(age, [alias])
        elif age.is_null:
            raise _Unsupported(f"key_groups[0].age of {name} is empty")
        else:
            raise SopsFileError(
                f"key_groups[0].age of {name} is a {_kind(age)}, expected a list of "
                "recipients; fix that rule"
            )
        return
    flat = rule.get("age")
    if flat is None:
        flat_group = any(rule.pair(key) for key in _FLAT_KEY_FIELDS)  # ``age`` joins it
        lines = [f"age: {recipient}"] if flat_group else _key_groups_block(doc.layout, [alias])
        doc.add_key(rule, lines, name)
    elif flat.kind == "seq":
        doc.append_item(flat, [alias])
    elif flat.kind == "scalar" and _split_flat(flat.value) and not flat.is_null:
        separator = ", " if ", " in flat.value else ","
        doc.replace_scalar(flat, flat.value.rstrip().rstrip(",") + separator + recipient)
    elif flat.kind == "scalar":
        raise _Unsupported(f"age of {name} is empty")
    else:
        raise SopsFileError(
            f"age of {name} is a {_kind(flat)}, expected a comma-separated string or a list; "
            "fix that rule"
        )


def _add_rule(doc: _Doc, root: _Node, items: list[str], path_regex: str) -> None:
    """Append a creation rule for ``path_regex`` with the recipients ``items``."""
    layout = doc.layout
    block = [f"path_regex: {_plain_or_quoted(path_regex)}", *_key_groups_block(layout, items)]
    prefix = layout.item_prefix(0)
    lines = [prefix + block[0]] + [" " * len(prefix) + line for line in block[1:]]
    pair = root.pair("creation_rules")
    rules = pair[1] if pair else None
    if rules is not None and not rules.is_null and not rules.flow:
        doc.append_item(rules, block)
    elif root.flow or (rules is not None and rules.flow and rules.items):
        raise _Unsupported("creation_rules is in flow style ([...])")
    elif pair is not None:
        doc.fill(pair[0], pair[1], lines)
    else:
        key_col = doc.column(root.pairs[0][0].start)
        body = ["creation_rules:", *lines]
        doc.insert_lines(
            doc.line_after(doc.content_end(root) - 1), [" " * key_col + line for line in body]
        )


def _add_key_entry(doc: _Doc, root: _Node, entry: str) -> None:
    """Add ``- &anchor recipient`` to ``keys:`` (created at the top when missing)."""
    pair = root.pair("keys")
    keys = pair[1] if pair else None
    if keys is not None and not keys.is_null:
        doc.append_item(keys, [entry])
    elif root.flow:
        raise _Unsupported("the top level is a flow mapping ({...})")
    elif pair is not None:
        doc.fill(pair[0], pair[1], [doc.layout.item_prefix(0) + entry])
    else:
        first_key = root.pairs[0][0]
        indent = " " * doc.column(first_key.start)
        lines = [indent + "keys:", indent + doc.layout.item_prefix(0) + entry]
        doc.insert_lines(doc.line_start(first_key.start), lines)


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

    Raises :class:`SopsFileError` on malformed input, ambiguous key entries, and shapes
    it does not edit (the message says what to add by hand).
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
    try:
        previous = _plan(doc, doc.root, anchor, recipient, path_regex)
    except _Unsupported as exc:
        raise SopsFileError(
            f"{exc}, a shape enroll does not edit; add the host by hand: '- &{anchor} "
            f"{recipient}' under keys: and '*{anchor}' in the age keys of the creation rule "
            f"for {path_regex!r} (add that rule if missing), then rerun"
        ) from None
    if not doc.edits:
        return EnrollResult(text, False, None, _covered(doc, recipient))
    new_text = doc.result()
    try:  # the edited text must parse and need no further edit
        check = _Doc.parse(new_text)
        if check.root is None or _plan(check, check.root, anchor, recipient, path_regex):
            raise SopsFileError("the host's key was replaced again")
        if check.edits:
            raise SopsFileError("the edited file does not include the host")
    except (SopsFileError, _Unsupported) as exc:  # pragma: no cover - a bug in the editing code
        raise SopsFileError(
            f"could not edit .sops.yaml safely ({exc}); add the key by hand and report this"
        ) from None
    return EnrollResult(new_text, True, previous, _covered(check, recipient))


def _new_document(anchor: str, recipient: str, path_regex: str, newline: str) -> str:
    prefix = _Layout().item_prefix(0)
    rule = [f"path_regex: {_plain_or_quoted(path_regex)}"]
    rule += _key_groups_block(_Layout(), [f"*{anchor}"])
    lines = ["keys:", f"{prefix}&{anchor} {recipient}", "creation_rules:"]
    lines += [prefix + rule[0]] + [" " * len(prefix) + line for line in rule[1:]]
    return "".join(line + newline for line in lines)


def _covered(doc: _Doc, recipient: str) -> tuple[str, ...]:
    return tuple(_rule_regex(r) for r in doc.rules() if recipient in _rule_recipients(r))


def _plan(doc: _Doc, root: _Node, anchor: str, recipient: str, path_regex: str) -> str | None:
    """Queue the edits on ``doc``; return the previous recipient if it is replaced."""
    keys = doc.top_list("keys", "'- &anchor age1...' entries")
    # An alias must come after its anchor; if ``keys:`` follows ``creation_rules:``,
    # rules get the recipients written out instead.
    keys_pair, rules_pair = root.pair("keys"), root.pair("creation_rules")
    use_aliases = not (keys_pair and rules_pair and keys_pair[0].start > rules_pair[0].start)
    alias = f"*{anchor}" if use_aliases else recipient

    host_entry: _Node | None = None
    admins: list[str] = []
    for index, item in enumerate(keys.items if keys is not None else []):
        if item.kind != "scalar":
            if item.kind != "alias" and item.anchor == anchor:
                raise SopsFileError(
                    f"keys[{index}] has anchor &{anchor} but is a {_kind(item)}, not an age "
                    f"recipient; rename that anchor or make it '- &{anchor} age1...'"
                )
        elif item.anchor == anchor:
            host_entry = item
        elif item.value == recipient:
            label = f"&{item.anchor}" if item.anchor else "an entry without an anchor"
            raise SopsFileError(
                f"recipient {recipient} is already in keys as {label}; rename it to "
                f"&{anchor} (and its aliases) so the host has one entry"
            )
        elif item.anchor and not item.anchor.startswith(HOST_ANCHOR_PREFIX):
            admins.append(f"*{item.anchor}" if use_aliases else _plain_or_quoted(item.value))
    for path, node in _walk(root):
        if node.kind != "alias" and node.anchor == anchor and node is not host_entry:
            raise SopsFileError(
                f"anchor &{anchor} is already used by {path or 'the document'}, not by an "
                "entry of keys; rename that anchor"
            )

    previous: str | None = None
    if host_entry is None:
        _add_key_entry(doc, root, f"&{anchor} {recipient}")
    elif host_entry.value != recipient:
        previous = host_entry.value
        doc.replace_scalar(host_entry, recipient)
        _replace_literals(doc, previous, recipient)

    rules = doc.rules()
    target = next((r for r in rules if r.pair("path_regex") and _rule_regex(r) == path_regex), None)
    if target is None:
        _add_rule(doc, root, [alias, *admins], path_regex)
    elif not {recipient, previous} & set(_rule_recipients(target)):
        _add_to_rule(doc, target, alias, recipient)
    return previous


def _replace_literals(doc: _Doc, old: str, new: str) -> None:
    """Rewrite literal copies of the old recipient in creation rules (aliases follow the
    anchor by themselves)."""
    pattern = re.compile(rf"(?<![0-9a-z]){re.escape(old)}(?![0-9a-z])")
    for rule in doc.rules():
        for _, node in _walk(rule):
            for item in node.items:
                if item.kind == "scalar" and item.value == old:
                    doc.replace_scalar(item, new)
        flat = rule.get("age")
        if flat is not None and flat.kind == "scalar" and old in _split_flat(flat.value):
            doc.replace_scalar(flat, pattern.sub(new, flat.value))
