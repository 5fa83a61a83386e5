"""Documentation: the config table is current, every field is documented, the
README's test command is CI's, and relative links in README/docs resolve."""

import glob
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import default  # noqa: E402
from demjax.config import (  # noqa: E402
    CONFIG_DOC,
    field_docs,
    fields_markdown,
    flat_fields,
    write_config_table,
)

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def read(rel):
    with open(os.path.join(REPO, rel)) as f:
        return f.read()


def test_every_field_documented():
    assert set(field_docs()) == set(flat_fields(default.get_config()))


def table_of(text: str) -> str:
    return text[text.index(START) + len(START) : text.index(END)].strip()


def test_config_table_in_sync():
    current = fields_markdown(default.get_config()).strip()
    assert table_of(read(CONFIG_DOC)) == current, (
        f"{CONFIG_DOC} config table is stale: regenerate with "
        "`python -m demjax.config --docs`"
    )


def test_stale_table_detected_and_regenerated(tmp_path):
    current = fields_markdown(default.get_config()).strip()
    text = read(CONFIG_DOC)
    stale = text.replace("| A, number of agents (>= 2) |", "| number of agents |")
    assert table_of(stale) != current  # the check above fails on a stale table
    path = tmp_path / "config.md"
    path.write_text(stale)
    write_config_table(str(path))
    fresh = path.read_text()
    assert table_of(fresh) == current
    assert fresh.split(START)[0] == text.split(START)[0]
    assert fresh.split(END)[1] == text.split(END)[1]


def markdown_files():
    files = ["README.md"] + sorted(
        os.path.relpath(p, REPO)
        for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)
    )
    files += sorted(
        os.path.relpath(p, REPO)
        for p in glob.glob(os.path.join(REPO, "benchmarks", "results", "*.md"))
    )
    return files


# [text](target) and ![alt](target); targets without spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"```.*?```", re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    text = CODE_BLOCK.sub("", read(path))
    out, seen = set(), {}
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", text, re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_relative_links_resolve():
    bad = []
    for rel in markdown_files():
        text = INLINE_CODE.sub("", CODE_BLOCK.sub("", read(rel)))
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
                continue
            path, _, frag = target.partition("#")
            dest = (
                rel
                if not path
                else os.path.normpath(os.path.join(os.path.dirname(rel), path))
            )
            if not os.path.exists(os.path.join(REPO, dest)):
                bad.append(f"{rel}: {target} (no file {dest})")
            elif frag and dest.endswith(".md") and frag not in anchors(dest):
                bad.append(f"{rel}: {target} (no heading #{frag} in {dest})")
    assert not bad, "broken relative links:\n" + "\n".join(bad)


def test_readme_test_command_is_ci_command():
    # .ci/run runs exactly the README's test command; keep the two identical.
    ci = read(".ci/run").strip().splitlines()[-1]
    readme = read("README.md")
    assert ci == "python -m pytest -q tests"
    assert f"pip install -e '.[dev]' && {ci}\n" in readme


def test_no_private_paths_in_docs():
    # Users do not have the project's shared/ directory: docs cite docs/ instead.
    for rel in markdown_files():
        assert "shared/docs" not in read(rel), rel
