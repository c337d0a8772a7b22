"""Print the CI device matrix (JSON) from platforms/*.toml, for the workflow's plan job."""

from __future__ import annotations

import json
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def matrix() -> dict:
    include = []
    for path in sorted((ROOT / "platforms").glob("*.toml")):
        p = tomllib.loads(path.read_text())
        runs_on = ["self-hosted", p["ci_runner"]] if p["self_hosted"] else [p["ci_runner"]]
        include.append({"platform": p["name"], "session": f"tests-{p['name']}", "runs_on": runs_on})
    return {"include": include}


if __name__ == "__main__":
    print(json.dumps(matrix(), separators=(",", ":")))
