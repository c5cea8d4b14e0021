"""Every row of the bad-input table (bad_input_table.py, rendered as docs/errors.md): the call
raises that exception with a message that starts as the table says, and the document is the
table's current rendering."""
import re

import pytest

import bad_input_table as table

ROWS = table.rows()


@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r.entry}-{r.bad}".replace(" ", "_")) for r in ROWS])
def test_bad_input_raises(row):
    with pytest.raises(row.exc, match="^" + re.escape(row.message)):
        row.call()


def test_rows_are_distinct():
    keys = [(r.entry, r.bad) for r in ROWS]
    assert len(keys) == len(set(keys)), "two rows for one (entry point, bad input)"


def test_doc_is_the_rendered_table():
    with open(table.DOC) as f:
        doc = f.read()
    assert doc == table.render(), "docs/errors.md is out of date: run `python python_tests/bad_input_table.py`"
