"""README's config table equals the generated one, and every field is documented."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import default  # noqa: E402
from demjax.config import field_docs, fields_markdown, flat_fields  # noqa: E402


def test_every_field_documented():
    assert set(field_docs()) == set(flat_fields(default.get_config()))


def test_readme_table_in_sync():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    start = text.index("<!-- config-table:start -->") + len(
        "<!-- config-table:start -->"
    )
    end = text.index("<!-- config-table:end -->")
    assert text[start:end].strip() == fields_markdown(default.get_config()).strip(), (
        "README config table is stale: regenerate with `python -m demjax.config --readme`"
    )
