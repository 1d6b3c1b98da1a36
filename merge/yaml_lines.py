"""Plan YAML in and out: loading that remembers where each mapping and key came from (for errors that cite
the line), and writing a document back as mergekit reads it."""

from __future__ import annotations

from pathlib import Path

import yaml

from mergescope.checkpoints import MergescopeError


class LinedDict(dict):
    """A mapping from YAML with the 1-based line of itself (``line``) and of each key (``key_lines``)."""

    line: int = 0
    key_lines: dict

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LinedDict:
    loader.flatten_mapping(node)
    mapping = LinedDict()
    mapping.line = node.start_mark.line + 1
    mapping.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise yaml.constructor.ConstructorError(None, None, f"unhashable key {key!r}", key_node.start_mark)
        if key in mapping:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[key] = key_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


#: the most values a plan may hold once YAML aliases are expanded (real plans hold hundreds); a few lines of
#: nested aliases ("billion laughs") would otherwise expand to billions
MAX_PLAN_VALUES = 100_000
#: the largest plan file read
MAX_PLAN_BYTES = 10_000_000


def load_yaml(text: str, source: str) -> object:
    """Parse YAML; a syntax error is one :class:`MergescopeError` citing ``source:line:column``, and so is a
    document nested deeper than the parser goes or expanding (through aliases) to over
    :data:`MAX_PLAN_VALUES` values."""
    loader = None
    try:
        loader = _LineLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise MergescopeError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise MergescopeError(f"{source}: YAML error: {exc}") from None
    except RecursionError:
        raise MergescopeError(f"{source}: nested too deeply to be a plan") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_size(root: yaml.Node, source: str) -> None:
    """Count the document's values as constructing it would (an alias counts its whole target again)."""
    seen, stack = 0, [root]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_PLAN_VALUES:
            raise MergescopeError(f"{source}: expands to more than {MAX_PLAN_VALUES} values (through YAML aliases?); "
                                  "not a plan")
        if isinstance(node, yaml.MappingNode):
            stack.extend(part for pair in node.value for part in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def plain_document(value: object) -> object:
    """A deep copy of a loaded YAML document with plain dicts and lists (what ``yaml.safe_dump`` writes)."""
    if isinstance(value, dict):
        return {k: plain_document(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_document(v) for v in value]
    return value


def dump_yaml(document: object) -> str:
    """``document`` as YAML text in the plan's key order, short lists inline, unicode as is."""
    return yaml.safe_dump(plain_document(document), sort_keys=False, default_flow_style=None, allow_unicode=True)


def read_yaml_file(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PLAN_BYTES + 1)
        if len(data) > MAX_PLAN_BYTES:
            raise MergescopeError(f"{path}: larger than {MAX_PLAN_BYTES // 1_000_000} MB; not a plan")
        text = data.decode("utf-8")
    except OSError as exc:
        raise MergescopeError(f"{path}: cannot read the plan: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise MergescopeError(f"{path}: the plan is not UTF-8 text") from None
    return load_yaml(text, str(path))
