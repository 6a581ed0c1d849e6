"""Scale the sandbox's GPU node set (sandbox/nodes.yaml) to N nodes with the same product mix.

Used by sandbox/up.sh when SANDBOX_NODES is set, e.g. for load tests with hundreds of nodes:
node i is a copy of template node i mod len(templates), so the H100/A100/L40S/L4 proportions of
the file are kept. The first len(templates) nodes keep their names; later copies get a `-x<k>`
suffix. Labels (product, rack, ...) and status are copied unchanged, except kubernetes.io/hostname.
Prints a YAML stream on stdout for `kubectl create -f -`.

Not for: defining products (edit sandbox/nodes.yaml) or creating nodes itself.
Usage: python sandbox/nodes.py sandbox/nodes.yaml 200
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml


def scale_nodes(templates: list[dict[str, Any]], node_count: int) -> list[dict[str, Any]]:
    """Return node_count Node objects cycling through templates (in file order)."""
    if not templates:
        raise ValueError("scale_nodes: the node file holds no Node objects")
    if node_count < 1:
        raise ValueError(f"scale_nodes: node_count={node_count} must be at least 1")
    nodes = []
    for index in range(node_count):
        node = copy.deepcopy(templates[index % len(templates)])
        copy_number = index // len(templates)
        if copy_number:
            name = f"{node['metadata']['name']}-x{copy_number}"
            node["metadata"]["name"] = name
            node["metadata"].setdefault("labels", {})["kubernetes.io/hostname"] = name
        nodes.append(node)
    return nodes


def load_templates(path: Path) -> list[dict[str, Any]]:
    """Read the Node objects of a YAML stream; anything else in it is an error."""
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for position, doc in enumerate(documents):
        if not isinstance(doc, dict) or doc.get("kind") != "Node":
            raise ValueError(f"{path}: document {position} is not a Node (kind must be Node)")
    return documents


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: nodes.py NODES_YAML NODE_COUNT", file=sys.stderr)
        return 2
    try:
        nodes = scale_nodes(load_templates(Path(argv[0])), int(argv[1]))
    except (OSError, ValueError) as error:
        print(f"sandbox/nodes.py: {error}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(nodes, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
