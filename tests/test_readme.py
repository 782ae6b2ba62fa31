"""The README and docs/*.md are part of the product: their Python examples must run as printed,
the README must stay short enough to read, and every link in them must lead somewhere."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 250

EXAMPLES = [(page, i, code) for page in PAGES
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))]


def _name(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


STATED = re.compile(r"^\s*print\(.*\)\s*# prints: (.*)$", re.M)  # a print states what it prints


@pytest.mark.parametrize("page,index,code", EXAMPLES, ids=[f"{_name(p)}-example{i}" for p, i, _ in EXAMPLES])
def test_python_example_runs_and_prints_what_it_says(page, index, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(code, f"{page}:example{index}", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.splitlines()
    assert printed == STATED.findall(code), "every print of an example says what it prints: `# prints: ...`"


def test_the_stated_outputs_are_found():
    stated = [line for _, _, code in EXAMPLES for line in STATED.findall(code)]
    assert "40 1 []" in stated and len(stated) >= 3


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `#` comment in a bash block is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated one numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _prose(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(text: str) -> list[str]:
    """The relative links of a page's prose (`[text](target)`), web links left out."""
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", _prose(text)) if not re.match(r"[a-z]+:", t)]


def test_anchors_follow_github():
    assert anchors("# vqvae2\n## The model library (`vqvae2/`)\n## On a Prefect server, deployed and scheduled\n"
                   "```bash\n# not a heading\n```\n## Errors\n## Errors\n") == {
        "vqvae2", "the-model-library-vqvae2", "on-a-prefect-server-deployed-and-scheduled", "errors", "errors-1"}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_links_resolve(page):
    """Every relative link names an existing file, and its `#anchor` a heading of that file."""
    broken = []
    for target in links(page.read_text()):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {_name(file)}")
    assert not broken, f"{_name(page)}: " + "; ".join(broken)


def test_readme_is_short_and_starts_with_its_contents():
    text = README.read_text()
    assert len(text.splitlines()) < MAX_README_LINES, "move reference material to docs/*.md"
    headings = re.findall(r"^## +(.+)$", _prose(text), re.M)
    assert headings[0] == "Contents", "the first section is the contents"
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = links(contents)
    # Each other section of the README, and each page of docs/, is listed there.
    own = {t.removeprefix("#") for t in listed if t.startswith("#")}
    assert anchors("\n".join(f"## {h}" for h in headings[1:])) <= own
    assert {f"docs/{page.name}" for page in DOCS} <= {t.split("#")[0] for t in listed}
    assert DOCS, "the reference lives in docs/*.md"


def test_readme_keeps_the_test_command():
    """`.ci/run` runs the test command the README gives; the two must not drift apart."""
    command = "python3 -m pytest -q -n 2 --dist loadfile tests"
    assert f"```bash\n{command}\n```" in README.read_text()
    assert command in (REPO / ".ci" / "run").read_text()
