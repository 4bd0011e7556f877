"""The documentation stays true to the code: the configuration reference is generated and current, and the
README and docs/ link only to files inside the repository (or to public URLs)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_configuration_reference_is_current():
  from configs import reference

  committed = (ROOT / "docs" / "configuration.md").read_text()
  assert committed == reference.render(), "docs/configuration.md is stale: run `python -m configs.reference`"


def test_configuration_reference_lists_every_field():
  from configs import default
  from configs import reference

  text = reference.render()
  leaves = [name for name, _, is_section in reference._flatten(default.get_config()) if not is_section]
  assert len(leaves) > 50
  missing = [name for name in leaves if f"| `{name}` |" not in text]
  assert not missing


def test_reference_reads_comments_from_default_py():
  from configs import reference

  notes, order = reference.descriptions(
      "config = ml_collections.ConfigDict()\n"
      "# Whole-line note.\n"
      "config.data = data = ml_collections.ConfigDict()\n"
      "data.dir = ''  # trailing note\n"
      "data.phantom = ml_collections.ConfigDict({\n"
      "    'cases': 10,  # per entry\n"
      "})\n")
  assert notes == {"data": "Whole-line note.", "data.dir": "trailing note", "data.phantom.cases": "per entry"}
  assert order == ["data", "data.dir", "data.phantom", "data.phantom.cases"]


def test_links_stay_inside_the_repository():
  for doc in DOCS:
    for target in LINK.findall(doc.read_text()):
      if target.startswith(("http://", "https://", "#", "mailto:")):
        continue
      path = (doc.parent / target.split("#")[0]).resolve()
      assert ROOT in path.parents or path == ROOT, f"{doc.name} links outside the repository: {target}"
      assert path.exists(), f"{doc.name} links to a missing file: {target}"


def test_no_pointers_outside_the_repository():
  for doc in DOCS + sorted((ROOT / "colab").glob("*.ipynb")):
    text = doc.read_text()
    assert "../shared" not in text and "/work/" not in text, f"{doc.name} points outside the repository"
