"""CI executes the Colab notebook on CPU with a small parameter set."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow(seconds=35)  # a Jupyter kernel and a 64-agent run
def test_colab_notebook_runs_on_cpu(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DEMJAX_NOTEBOOK_SMALL", "1")
    path = os.path.join(REPO, "notebooks", "demjax_colab_tpu.ipynb")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3")
    client.execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "backend: cpu" in text
    assert "devices used:" in text and "c_spe" in text
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs
        if "image/png" in o.get("data", {})
    ]  # fmt: skip
    assert len(images) == 2  # curves and tree


def test_notebook_installs_the_wheel_the_readme_builds():
    """The install cell needs no editing: it takes the wheel whose name the README's
    "Colab notebook" steps produce (the version of pyproject.toml), no repository
    URL."""
    import json
    import re

    with open(os.path.join(REPO, "pyproject.toml")) as f:
        version = re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)
    wheel = f"demjax-{version}-py3-none-any.whl"
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Colab notebook") :]
    assert "pip wheel --no-deps -w dist ." in section and f"dist/{wheel}" in section
    with open(os.path.join(REPO, "notebooks", "demjax_colab_tpu.ipynb")) as f:
        cells = json.load(f)["cells"]
    install = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
    assert '"/content/demjax-*.whl"' in install and "files.upload()" in install
    assert "http" not in install and "REPO_URL" not in install
