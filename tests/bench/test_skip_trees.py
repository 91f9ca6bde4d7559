"""bench/skip_trees.py: each probe tree's edits still find their text in the kernels, once, and leave valid Python
(a kernel change that moves that text breaks the tree here, not on the device)."""

import ast
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "skip_trees.py"
_SPEC = importlib.util.spec_from_file_location("skip_trees", _PATH)
skip_trees = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(skip_trees)


@pytest.mark.parametrize("name", sorted(skip_trees.EDITS))
def test_every_tree_is_written_with_its_edits(tmp_path, name):
    src = skip_trees.write_tree(name, trees=tmp_path)
    for file in {file for file, _, _ in skip_trees.EDITS[name]}:
        before = (skip_trees.ROOT / "src" / file).read_text()
        after = (src / file).read_text()
        assert after != before
        ast.parse(after)
        for _, old, new in skip_trees.EDITS[name]:
            if old in before:
                assert new in after
    assert (src / "tilemoe" / "__init__.py").is_file()


def test_an_edit_whose_text_is_gone_is_refused():
    with pytest.raises(SystemExit, match="found it 0 times"):
        skip_trees.edited("nothing here", "tl.store(", "", "test")
