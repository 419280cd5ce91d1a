"""The README's status table is what scripts/status_table.py writes from the package's exports."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "status_table", ROOT / "scripts" / "status_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_status_table_is_current():
    script = _script()
    text = script.README.read_text()
    assert script.render(text) == text, (
        "README.md's status table differs from the package's exports: "
        "run python scripts/status_table.py"
    )


def test_every_group_is_listed_once_and_tested_rows_name_real_groups():
    script = _script()
    groups = [g for g, _, _ in script.GROUPS]
    assert len(groups) == len(set(groups))
    assert set(script.TESTED) <= set(groups)
    names = [(m, n) for _, m, ns in script.GROUPS for n in ns]
    assert len(names) == len(set(names))


def test_a_missing_name_is_reported_as_planned(monkeypatch):
    script = _script()
    monkeypatch.setattr(script, "GROUPS", [("Demo", "", ("warmup", "no_such_op_yet"))])
    row = script.table().splitlines()[2]
    assert "partial (1 of 2; planned: `no_such_op_yet`)" in row
