"""The README stays true: its code links point at the definitions they name, its config table lists every key with
its default, and it holds exactly the two set-up commands that .ci/run also runs."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from readme_links import LINK, definition_line  # noqa: E402

README = (ROOT / "README.md").read_text()


def test_code_links_point_at_their_definitions():
    links = LINK.findall(README)
    assert len(links) >= 30
    for name, file, line in links:
        assert definition_line(ROOT / file, name) == int(line), f"{name} in {file}: run python tools/readme_links.py"


def test_config_table_lists_every_key():
    from ei2.config import describe_keys

    for key, default, _ in describe_keys():
        row = re.search(rf"^\| `{key}` \| (.*?) \|", README, re.M)
        assert row, key
        if default not in ("", None, []):
            assert row.group(1) == f"`{default}`", key


def test_two_setup_commands_and_ci_runs_the_test_one():
    block = README.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["pip install -e . && python -m ei2.train", 'pip install -e ".[test]" && python -m pytest -q']
    assert 'pip install -q -e ".[test]" && python -m pytest -q' in (ROOT / ".ci/run").read_text()
