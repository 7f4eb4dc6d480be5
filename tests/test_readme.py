"""README.md's figures that a change can silently make stale: the methods table's line counts."""
import os
import re

from conftest import ROOT


def test_methods_table_gives_each_scripts_line_count():
    with open(os.path.join(ROOT, "README.md")) as f:
        rows = re.findall(r"\| \[`(\w+\.py)`\]\(\1\) \(\[docs\]\([^)]*\)\) \| (\d+) \|", f.read())
    assert sorted(script for script, _ in rows) == ["hnpm.py", "median_triplet.py", "reco.py", "ressl.py", "smog.py"]
    for script, lines in rows:
        with open(os.path.join(ROOT, script)) as f:
            assert int(lines) == len(f.readlines()), f"README.md says {script} has {lines} lines"
