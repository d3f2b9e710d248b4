"""Refresh the `#L<n>` line anchors of README links like [`name`](ei2/attention.py#L53) so each points at the line
that defines `name` (def/class, or a test function). tests/test_readme.py checks they are right.

    python tools/readme_links.py          # rewrite README.md in place
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[`([A-Za-z_][\w.]*)`\]\(((?:ei2|tests)/[\w/]+\.py)#L(\d+)\)")


def definition_line(path: Path, name: str) -> int | None:
    short = name.split(".")[-1]
    pattern = re.compile(rf"^\s*(def|class)\s+{re.escape(short)}\b")
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if pattern.match(line):
            return i
    return None


def refresh(text: str) -> tuple[str, list[str]]:
    problems = []

    def fix(m):
        name, file, _ = m.groups()
        line = definition_line(ROOT / file, name)
        if line is None:
            problems.append(f"{name} not defined in {file}")
            return m.group(0)
        return f"[`{name}`]({file}#L{line})"

    return LINK.sub(fix, text), problems


if __name__ == "__main__":
    readme = ROOT / "README.md"
    text, problems = refresh(readme.read_text())
    readme.write_text(text)
    print("\n".join(problems) or "README links refreshed")
    sys.exit(1 if problems else 0)
