"""Label and field selectors, parsed and matched as kube-apiserver does.

The node agent narrows its watches with selectors (``metadata.name=<node>`` for its own Node,
``!service.kubernetes.io/headless`` style label selectors for Services), so the fake server
must both apply them and reject what the real server rejects: a syntax error or a field the
resource does not index is a 400 BadRequest. Supported label syntax is the full
``labels.Parse`` grammar short of escaping: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``,
``k in (a,b)``, ``k notin (a,b)``, ``k>1``, ``k<1``. Field selectors support ``=``, ``==`` and
``!=`` terms joined by commas, with backslash escapes.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_KEY_RE = re.compile(rf"(({_DNS_SUBDOMAIN})/)?{_NAME}")
_VALUE_RE = re.compile(rf"({_NAME})?")
_SET_RE = re.compile(r"(?P<key>[^\s!=<>(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)")


class SelectorError(ValueError):
    """A selector the real server would reject with 400 BadRequest; the text is its message."""


def _check_key(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    prefix = key[: -len(name) - 1] if "/" in key else ""
    if not _KEY_RE.fullmatch(key) or len(name) > 63 or len(prefix) > 253:
        raise SelectorError(
            f"unable to parse requirement: key: Invalid value: \"{key}\": name part must "
            "consist of alphanumeric characters, '-', '_' or '.', and must start and end "
            "with an alphanumeric character"
        )
    return key


def _check_value(value: str) -> str:
    if not _VALUE_RE.fullmatch(value) or len(value) > 63:
        raise SelectorError(
            f"unable to parse requirement: values[0]: Invalid value: \"{value}\": a valid "
            "label must be an empty string or consist of alphanumeric characters, '-', '_' "
            "or '.', and must start and end with an alphanumeric character"
        )
    return value


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside a ``( ... )`` value set."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"unable to parse requirement: unexpected ')' in {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise SelectorError(f"unable to parse requirement: unclosed '(' in {text!r}")
    parts.append("".join(current))
    return parts


@dataclass(frozen=True)
class Requirement:
    """One label requirement; ``operator`` is one of = != in notin exists !exists gt lt."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy this requirement (``labels.Requirement.Matches``)."""
        present = self.key in labels
        value = labels.get(self.key)
        match self.operator:
            case "=" | "in":
                return present and value in self.values
            case "!=" | "notin":
                return not present or value not in self.values
            case "exists":
                return present
            case "!exists":
                return not present
            case "gt" | "lt":
                if value is None:
                    return False
                try:
                    number = int(value)
                except ValueError:
                    return False
                bound = int(self.values[0])
                return number > bound if self.operator == "gt" else number < bound
        raise AssertionError(self.operator)


def _parse_requirement(term: str) -> Requirement:
    term = term.strip()
    if not term:
        raise SelectorError("unable to parse requirement: found '', expected: identifier")
    if set_match := _SET_RE.fullmatch(term):
        values = tuple(_check_value(v.strip()) for v in set_match["values"].split(","))
        return Requirement(_check_key(set_match["key"]), set_match["op"], values)
    if term.startswith("!"):
        return Requirement(_check_key(term[1:].strip()), "!exists")
    for token, operator in (("!=", "!="), ("==", "="), ("=", "="), (">", "gt"), ("<", "lt")):
        if token in term:
            key, _, value = term.partition(token)
            value = value.strip()
            if operator in ("gt", "lt") and not re.fullmatch(r"-?[0-9]+", value):
                raise SelectorError(
                    f"unable to parse requirement: for 'Gt', 'Lt' operators, the value must be "
                    f"an integer, got {value!r}"
                )
            if operator not in ("gt", "lt"):
                _check_value(value)
            return Requirement(_check_key(key.strip()), operator, (value,))
    return Requirement(_check_key(term), "exists")


@dataclass(frozen=True)
class LabelSelector:
    """A parsed ``labelSelector``: all requirements must hold (empty matches everything)."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """Parse the query parameter; raises :class:`SelectorError` like ``labels.Parse``."""
        if not text.strip():
            return cls()
        return cls(tuple(_parse_requirement(term) for term in _split_top_level(text)))

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether an object with these labels is selected."""
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        """True when the selector selects everything."""
        return not self.requirements


def _split_unescaped(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    out: list[str] = []
    chars = iter(value)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        nxt = next(chars, None)
        if nxt not in ("\\", ",", "="):
            raise SelectorError(f"invalid field selector: unescaped or invalid escape in {value!r}")
        out.append(nxt)
    return "".join(out)


@dataclass(frozen=True)
class FieldSelector:
    """A parsed ``fieldSelector``: ``(field, operator, value)`` terms, operator ``=`` or ``!=``."""

    terms: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def parse(cls, text: str, supported: Collection[str]) -> FieldSelector:
        """Parse and check each field against ``supported`` (``field label not supported``)."""
        terms: list[tuple[str, str, str]] = []
        for raw in _split_unescaped(text, ","):
            if not raw:
                continue
            parsed = _split_field_term(raw)
            if parsed is None:
                raise SelectorError(f"invalid selector: '{text}'; can't understand '{raw}'")
            field, operator, value = parsed
            if field not in supported:
                raise SelectorError(f"field label not supported: {field}")
            terms.append((field, operator, _unescape(value)))
        return cls(tuple(terms))

    def matches(self, fields: Mapping[str, str]) -> bool:
        """Whether an object with these selectable field values is selected."""
        for field, operator, value in self.terms:
            equal = fields.get(field, "") == value
            if equal != (operator == "="):
                return False
        return True

    @property
    def empty(self) -> bool:
        """True when the selector selects everything."""
        return not self.terms


def _split_field_term(term: str) -> tuple[str, str, str] | None:
    """``fields.splitTerm``: the first operator occurrence, trying ``!=``, ``==``, ``=``."""
    escaped = False
    for index, char in enumerate(term):
        if escaped or char == "\\":
            escaped = not escaped
            continue
        for token, operator in (("!=", "!="), ("==", "="), ("=", "=")):
            if term.startswith(token, index):
                return term[:index], operator, term[index + len(token):]
    return None
