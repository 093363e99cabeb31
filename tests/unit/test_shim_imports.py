"""An application importing the shim must not pull in the runner's heavy dependencies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("sqlalchemy", "alembic", "apscheduler", "pydantic", "yaml")


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    ).stdout
    return {m.split(".")[0] for m in json.loads(out)}


def test_importing_the_shim_loads_no_heavy_dependency() -> None:
    loaded = _modules_after("import migrator.shim\nfrom migrator.shim import ShardRouter")
    assert "redis" in loaded and "migrator" in loaded  # the probe really imported the shim
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_the_lazy_top_level_name_loads_no_heavy_dependency() -> None:
    loaded = _modules_after("from migrator import ShardRouter")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
