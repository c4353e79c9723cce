"""YAML for configs: PyYAML's safe loader, except that a key given twice in one mapping is an error.

PyYAML keeps the last of two equal keys without a word, so a config that sets `train.max_steps` twice trains with
whichever came last (the YAML spec calls such a document invalid). [`StrictSafeLoader`] refuses it at every depth,
naming the key by its dotted path and both lines.

>>> load_yaml("train:\\n  max_steps: 5\\n")
{'train': {'max_steps': 5}}
"""

from __future__ import annotations

from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(ValueError):
    """A mapping of a YAML document sets one key twice."""


class StrictSafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that raises [`DuplicateKeyError`] when a mapping, at any depth, repeats a key.

    Keys that a merge (`<<: *base`) brings in may be overridden as usual; only keys written twice are refused.
    The check runs on the composed node tree, before anything is constructed, so it sees each key as written
    (PyYAML's merge flattening rewrites mappings in place while it constructs them).
    """

    source: str = "<string>"

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_duplicate_keys(node)
        return super().construct_document(node)

    def _check_duplicate_keys(self, root: yaml.Node) -> None:
        seen_nodes: set[int] = set()  # aliases share nodes (and may point back at an ancestor)
        stack: list[tuple[yaml.Node, str]] = [(root, "")]
        while stack:
            node, path = stack.pop()
            if id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                first_line: dict[Any, int] = {}
                for key_node, value_node in node.value:
                    if key_node.tag == _MERGE_TAG:
                        stack.append((value_node, path))
                        continue
                    key = self._key_of(key_node)
                    name = f"{path}.{key}" if path else str(key)
                    line = key_node.start_mark.line + 1
                    if key in first_line:
                        raise DuplicateKeyError(
                            f"{self.source} sets `{name}` twice (lines {first_line[key]} and {line}): YAML would "
                            "silently keep only the last one; remove one of them")
                    first_line[key] = line
                    stack.append((value_node, name))

    def _key_of(self, key_node: yaml.Node) -> Any:
        """The key as the constructed mapping would hold it (`yes` and `true` are the same key), or its text."""
        if isinstance(key_node, yaml.ScalarNode):
            try:
                key = self.construct_object(key_node)
                hash(key)
                return key
            except (yaml.YAMLError, TypeError):
                pass
        return f"<{key_node.id} at line {key_node.start_mark.line + 1}>"  # a collection key: never equal to another


def load_yaml(text: str, source: str = "<string>") -> Any:
    """Parse one YAML document like `yaml.safe_load`, refusing duplicate keys.

    Args:
        text: the YAML text.
        source: how error messages name the document, e.g. ``"config file 'run.yaml'"``.

    Raises:
        DuplicateKeyError: a mapping repeats a key (the message names its dotted path and both lines).
        yaml.YAMLError: the text is not valid YAML.
    """
    loader = StrictSafeLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
