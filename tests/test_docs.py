"""The README is a front door and the docs link up: fast checks on the Markdown only (no Ray, no model).

- README.md stays short (at most 220 lines) and shows the two commands of a fresh machine;
- every relative link (``[x](path)``, ``![x](path)``, ``<img src=...>``, ``<a href=...>``) in
  README.md, docs/*.md and benchmarks/README.md names a file or folder inside the repository, and
  a ``#anchor`` names a heading of the target (GitHub's slugs).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 220


def _doc_files() -> list[Path]:
    files = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


_FENCE = re.compile(r"^\s*(```|~~~)")


def _strip_code(text: str, spans: bool = True) -> str:
    """The text without fenced code blocks, indented code blocks and (with `spans`) inline code
    spans: links and headings inside code are not links or headings. Line numbers are kept."""
    out: list[str] = []
    in_fence = False
    prev_blank_or_code = True
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            out.append("")
            prev_blank_or_code = True
            continue
        if in_fence:
            out.append("")
            continue
        # An indented code block starts after a blank line; list continuations here use 2 spaces.
        if line.startswith("    ") and prev_blank_or_code:
            out.append("")
            continue
        prev_blank_or_code = not line.strip()
        out.append(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line) if spans else line)
    return "\n".join(out)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercase, punctuation other than '-' and
    '_' dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _strip_code(path.read_text(encoding="utf-8"), spans=False).splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


_MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in a Markdown file, code left out."""
    out = []
    for no, line in enumerate(_strip_code(path.read_text(encoding="utf-8")).splitlines(), 1):
        out += [(no, m.group(1)) for m in _MD_LINK.finditer(line)]
        out += [(no, m.group(1)) for m in _HTML_LINK.finditer(line)]
    return out


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)) or target.startswith("//")


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of `path` whose file (inside `root`) or heading anchor does not exist."""
    problems = []
    for no, target in links(path):
        if _is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / unquote(file_part)).resolve()
        where = f"{path.relative_to(root)}:{no}: {target}"
        if not dest.is_relative_to(root):
            problems.append(f"{where} points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif unquote(anchor).lower() not in anchors(dest):
                problems.append(f"{where}: no heading '#{anchor}' in {dest.relative_to(root)}")
    return problems


@pytest.mark.fast
def test_readme_is_a_front_door_of_at_most_220_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (limit {MAX_README_LINES}): move detail to docs/ and link it")


@pytest.mark.fast
def test_readme_shows_the_commands_of_a_fresh_machine():
    text = README.read_text(encoding="utf-8")
    for command in ("make demo", "make test"):
        assert re.search(rf"{re.escape(command)}\b", text), f"README.md does not show `{command}`"


@pytest.mark.fast
@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path):
    assert links(doc) or doc != README, "README.md should link to the docs"
    problems = broken_links(doc)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.fast
def test_the_link_checker_catches_what_it_should(tmp_path):
    """The checker itself: GitHub slugs; broken files and anchors are reported, links in code are not."""
    assert github_slug("On a GPU (`gpu.sh`)") == "on-a-gpu-gpush"
    assert github_slug("The λ trade-off") == "the-λ-trade-off"
    assert github_slug("Starting over: `--fresh`") == "starting-over---fresh"
    assert github_slug("Realism: can a classifier tell the samples from real images?") == \
        "realism-can-a-classifier-tell-the-samples-from-real-images"
    (tmp_path / "docs" / "images").mkdir(parents=True)
    (tmp_path / "docs" / "images" / "a.png").write_bytes(b"")
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n```\n# Not a heading\n```\n", encoding="utf-8")
    doc = tmp_path / "docs" / "doc.md"
    doc.write_text("\n".join([
        "# Title", "## Part", "## Part", "",
        "[ok](#part-1) [ok](other.md#other) [bad](#nope) [bad](other.md#not-a-heading)",
        "[missing](no-such-file.md) ![img](images/a.png) [out](../../outside.md)",
        '<img src="images/none.png" width="10">', "", "    [in code](nowhere.md)", "",
        "`[span](nowhere.md)`", "```", "[fenced](nowhere.md)", "```", "",
    ]), encoding="utf-8")
    problems = broken_links(doc, root=tmp_path)
    for bad in ("#nope", "#not-a-heading", "no-such-file.md", "none.png", "outside.md"):
        assert any(bad in p for p in problems), (bad, problems)
    assert len(problems) == 5, problems


# -- every example runs ---------------------------------------------------------------------------

CODE = re.compile(r"(?:^<!-- (?P<skip>not run[^>]*?) -->\n)?^```(?P<lang>[a-z]*)\n(?P<code>.*?)^```", re.S | re.M)
RUN = ("python", "sh", "yaml")  # `text` blocks are synopses (placeholders in capitals), not commands


def code_blocks(path: Path) -> list[dict]:
    """The fenced blocks of a Markdown file: language, code, line, and why it is not run (a
    ``<!-- not run ... -->`` line right above it), in order."""
    text = path.read_text()
    return [{"lang": m["lang"], "code": m["code"], "line": text[: m.start()].count("\n") + 1, "skip": m["skip"]}
            for m in CODE.finditer(text)]


def shell_commands(code: str) -> list[str]:
    """A sh block's commands: continuation lines joined, comment-only lines dropped."""
    return [c for c in (line.strip() for line in code.replace("\\\n", " ").splitlines()) if c and not c.startswith("#")]


@pytest.mark.fast
def test_every_fenced_block_is_python_sh_yaml_or_text_and_every_skip_says_why():
    """Fast: each block is one of the languages the docs test knows, and a block it does not run says why."""
    for path in _doc_files():
        for b in code_blocks(path):
            assert b["lang"] in (*RUN, "text"), f"{path.name}:{b['line']}: ```{b['lang']}"
            assert b["skip"] is None or len(b["skip"]) > len("not run by the docs test: "), f"{path.name}:{b['line']}"



@pytest.mark.timeout(1800)
def test_every_example_in_the_readme_and_docs_runs_as_written(demo_workdir, monkeypatch):
    """Every fenced Python and shell block of README.md and docs/*.md runs as written, in order, on the
    demo's folder (the quick demo: jobs/demo.yaml, storage/demo.zarr, digit.png), and YAML blocks are
    valid specs. Python blocks of one page share a namespace, as in a notebook; a `ldam-sweep` line
    runs in-process, any other (pipes, jq) in bash. Skipped: blocks marked `not run` (a bucket, a
    cluster, `make test` itself), each with its reason."""
    import subprocess
    import sys

    import yaml
    from typer.testing import CliRunner

    from ldam_sweep.cli import app
    from ldam_sweep.spec import parse_job, parse_model_spec

    work, _, env = demo_workdir
    monkeypatch.chdir(work)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}
    runner = CliRunner()
    ran, skipped = 0, []
    for path in _doc_files():
        namespace: dict = {"__name__": f"docs_{path.stem}"}
        for b in code_blocks(path):
            where = f"{path.relative_to(ROOT)}:{b['line']}"
            if b["skip"] or b["lang"] not in RUN:
                skipped.append((where, b["skip"] or b["lang"]))
                continue
            if b["lang"] == "python":
                exec(compile(b["code"], where, "exec"), namespace)  # noqa: S102 - the docs' own examples
            elif b["lang"] == "yaml":
                doc = yaml.safe_load(b["code"])
                parse_model_spec(doc["model"]) if set(doc) == {"model"} else parse_job(doc)
            else:
                for cmd in shell_commands(b["code"]):
                    if cmd.startswith("ldam-sweep ") and "|" not in cmd:
                        import shlex

                        args = [a for a in shlex.split(cmd, comments=True)][1:]
                        result = runner.invoke(app, args, env={"COLUMNS": "100"})
                        assert result.exit_code == 0, f"{where}: {cmd}\n{result.output}\n{result.exception!r}"
                    else:
                        result = subprocess.run(["bash", "-c", f"set -eo pipefail; {cmd}"], capture_output=True,
                                                text=True, env=env, cwd=work, timeout=600)
                        assert result.returncode == 0 and result.stdout.strip() not in ("", "null"), \
                            f"{where}: {cmd}\n{result.stdout}\n{result.stderr[-3000:]}"
            ran += 1
    assert ran >= 15, (ran, skipped)
    assert all("not run" in why or why == "text" for _, why in skipped), skipped
