"""The README's usage example runs as written (docs that match the code)."""
import os
import re
from pathlib import Path

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.mark.skipif(not os.path.exists(README), reason="needs the source tree")
def test_readme_usage_example_runs():
    text = Path(README).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 10)
    assert namespace["y"].shape == (64, 64, 16, 16)


@pytest.mark.skipif(not os.path.exists(README), reason="needs the source tree")
def test_readme_channel_gated_example_runs():
    text = Path(README).read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "fbs_convert" in b]
    assert len(blocks) == 1, "the README has one example of the channel-gated models"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (4, 10) and len(namespace["gates"]) == 8
    assert namespace["count"].ratio > 1.0
