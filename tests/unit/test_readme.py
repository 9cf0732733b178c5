"""The README's two set-up commands stay true: CI runs the test command, the example exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(pip install [^\n]+)\n```", text)


def test_readme_has_the_two_setup_commands():
    install, tests = readme_commands()[:2]
    assert "mpimap run" in install and "examples/" in install
    example = re.search(r"(examples/\S+\.py)", install).group(1)
    assert (ROOT / example).exists()
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    tests = readme_commands()[1]
    marker = ci.index("# readme-test-command")
    assert ci[marker + 1].strip() == tests
