"""Read and edit the sandbox's endpoint list, $SANDBOX_DIR/endpoints.yaml.

The file lists every URL the sandbox started, so people and tests find them in one place:

    kubeconfig: /abs/path/.sandbox/kubeconfig
    endpoints:
      apiserver: https://127.0.0.1:40123
      etcd: http://127.0.0.1:40124
      prometheus: http://127.0.0.1:40200          # added by whoever starts Prometheus
      agent/gpu-h100-00: http://127.0.0.1:40300/metrics

Usage (SANDBOX_DIR defaults to <repo>/.sandbox):
    sandbox/endpoints.py add NAME URL      add or replace one endpoint
    sandbox/endpoints.py remove NAME       drop one (no error if absent)
    sandbox/endpoints.py get NAME          print its URL (exit 1 if absent)
    sandbox/endpoints.py list              print `NAME URL` lines
Writers take a lock and replace the file atomically, so agents may add themselves concurrently.

Not for: starting anything, or checking that an endpoint answers.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def endpoints_file() -> Path:
    return Path(os.environ.get("SANDBOX_DIR") or REPO_ROOT / ".sandbox") / "endpoints.yaml"


def read_endpoints(path: Path) -> dict[str, Any]:
    """The whole document; an absent file reads as no endpoints."""
    if not path.exists():
        return {"endpoints": {}}
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict) or not isinstance(document.get("endpoints", {}), dict):
        raise ValueError(f"{path}: expected a mapping with an `endpoints` mapping of NAME: URL")
    document.setdefault("endpoints", {})
    return document


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / ".endpoints.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write(path: Path, document: dict[str, Any]) -> None:
    text = "# Endpoints of this sandbox; edit with sandbox/endpoints.py add|remove NAME [URL].\n"
    text += yaml.safe_dump(document, sort_keys=False)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".endpoints.")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temporary, path)


def set_endpoint(path: Path, name: str, url: str | None) -> None:
    """Add or replace endpoint `name`; url=None removes it."""
    if not name or any(character.isspace() for character in name):
        raise ValueError(f"endpoint name {name!r} must be non-empty without whitespace")
    if url is not None and "://" not in url:
        raise ValueError(
            f"endpoint {name}: url {url!r} must be a URL such as http://127.0.0.1:9090"
        )
    with _locked(path):
        document = read_endpoints(path)
        if url is None:
            document["endpoints"].pop(name, None)
        else:
            document["endpoints"][name] = url
        _write(path, document)


def main(argv: list[str]) -> int:
    path = endpoints_file()
    try:
        match argv:
            case ["add", name, url]:
                set_endpoint(path, name, url)
            case ["remove", name]:
                set_endpoint(path, name, None)
            case ["get", name]:
                url = read_endpoints(path)["endpoints"].get(name)
                if url is None:
                    print(f"sandbox/endpoints.py: no endpoint {name!r} in {path}", file=sys.stderr)
                    return 1
                print(url)
            case ["list"]:
                for name, url in read_endpoints(path)["endpoints"].items():
                    print(name, url)
            case _:
                print(__doc__, file=sys.stderr)
                return 2
    except (OSError, ValueError, yaml.YAMLError) as error:
        print(f"sandbox/endpoints.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
