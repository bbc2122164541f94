"""Print pyproject.toml's [project] dependencies, one per line: the Dockerfile installs them in a layer of their own,
which a change of the source (or of the rest of pyproject.toml) does not rebuild."""
from __future__ import annotations

import sys

import tomllib


def requirements(pyproject: str) -> list[str]:
    with open(pyproject, "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")))
