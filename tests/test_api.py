"""The README's library example runs as written."""

import re

from conftest import REPO


def test_readme_library_example_runs(monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## As a library") :]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(REPO)
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    value = float(out.strip().rsplit(":", 1)[1])
    # Each query finds itself at distance 0, ranked first by the index tie rule: mAP >= 1/16.
    assert 1 / 16 <= value <= 1.0
