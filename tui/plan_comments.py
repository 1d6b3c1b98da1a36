"""Keep a plan file's comments when the builder saves over it (pure, no Textual).

PyYAML drops comments, so they are carried over line by line: every comment of the old file is tied to the
key it sits on (a trailing comment) or above (a block of comment lines), the key named by its path through
the document — ``models/[model=./ft_a]/parameters/density`` — and written again beside the same key in the
new text. A comment whose key the new plan no longer has (a parameter the method dropped) goes with it;
comments after the last key stay at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from mergescope.tui.plan_document import to_yaml

#: ``  - key: value`` / ``key:`` — an optional list dash, a plain key, a colon
_KEY = re.compile(r"^(?P<indent> *)(?P<dash>- +)?(?P<key>[A-Za-z0-9_.\-/+]+) *:(?: +(?P<value>.*))?$")


@dataclass
class _Comments:
    above: dict[str, list[str]] = field(default_factory=dict)  # key path → comment lines above it
    trailing: dict[str, str] = field(default_factory=dict)  # key path → the comment at the end of its line
    tail: list[str] = field(default_factory=list)  # comment lines after the last key


def split_comment(line: str) -> tuple[str, str | None]:
    """``key: value  # note`` → (``key: value``, ``# note``): a ``#`` after a blank, outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), None


def key_paths(lines: list[str]) -> list[str | None]:
    """The key path each line opens (None for lines that open none: comments, blanks, flow items)."""
    stack: list[tuple[int, str]] = []
    paths: list[str | None] = []
    for line in lines:
        content, _ = split_comment(line)
        match = _KEY.match(content)
        if not match:
            paths.append(None)
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = match["key"]
        if match["dash"]:
            value = (match["value"] or "").strip().strip("'\"")
            stack.append((indent, f"[{key}={value}]"))
            indent += len(match["dash"])
        stack.append((indent, key))
        paths.append("/".join(name for _, name in stack))
    return paths


def collect(text: str) -> _Comments:
    """Where the comments of ``text`` sit, by key path."""
    lines = text.splitlines()
    found, pending = _Comments(), []
    for line, path in zip(lines, key_paths(lines)):
        content, comment = split_comment(line)
        if path is None:
            if comment is not None and not content.strip():
                pending.append(comment)
            continue
        if pending:
            found.above.setdefault(path, []).extend(pending)
            pending = []
        if comment is not None:
            found.trailing[path] = comment
    found.tail = pending
    return found


def with_comments(old_text: str, new_text: str) -> str:
    """``new_text`` with the comments of ``old_text`` beside the keys both still have (see the module)."""
    comments = collect(old_text)
    lines = new_text.splitlines()
    out: list[str] = []
    for line, path in zip(lines, key_paths(lines)):
        if path is not None:
            indent = " " * (len(line) - len(line.lstrip(" -")))
            out += [indent + comment for comment in comments.above.get(path, [])]
            if path in comments.trailing:
                line = f"{line}  {comments.trailing[path]}"
        out.append(line)
    out += comments.tail
    return "\n".join(out) + "\n"


def has_comments(text: str) -> bool:
    return any(split_comment(line)[1] is not None for line in text.splitlines())


def plan_file_text(document: dict, old_text: str | None) -> str:
    """What saving ``document`` over a file holding ``old_text`` (None: a new file) writes: the plan as the
    builder writes it, or, when the old file had comments, in block style with its comments carried over."""
    if old_text is None or not has_comments(old_text):
        return to_yaml(document)
    return with_comments(old_text, block_yaml(document))


def block_yaml(document: dict) -> str:
    """The document in block style: every key on its own line, so each comment finds its key again."""
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True)
