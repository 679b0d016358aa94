"""The README's Python examples are part of the contract: run every ```python block, in order."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}  # the blocks are one session, read top to bottom
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()
    assert "    python -m pytest" in README.read_text().splitlines()
    assert ci[-1] == "python -m pytest"
