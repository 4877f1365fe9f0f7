"""The operator's documents name only what exists: every tag a README or a doc tells you to run, every role
variable, every repository path and every `python -m app` command with its flags. A rename that leaves a
document behind fails here, not on an operator's first day."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from app.__main__ import build_parser
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("roles/*/README.md")])
ROLES = sorted(path.name for path in (REPO / "roles").iterdir() if (path / "defaults").is_dir())
VARIABLE = re.compile(rf"^(?:pli|{'|'.join(ROLES)})_[a-z0-9_]+$")
REPO_PATH = re.compile(r"^(?:app|bench|docs|inventories|molecule|playbooks|requirements|roles|scripts|tests)/[\w./-]+$")


def documents() -> list[object]:
    return [pytest.param(path, id=str(path.relative_to(REPO))) for path in DOCUMENTS]


def code_spans(text: str) -> Iterator[str]:
    yield from re.findall(r"`([^`\n]+)`", text)


def yaml_tags(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "tags":
                yield from [value] if isinstance(value, str) else value
            else:
                yield from yaml_tags(value)
    elif isinstance(node, list):
        for item in node:
            yield from yaml_tags(item)


def defined_tags() -> set[str]:
    files = [REPO / "site.yml", *REPO.glob("playbooks/*.yml"), *REPO.glob("roles/*/tasks/*.yml")]
    return {tag for path in files for tag in yaml_tags(yaml.safe_load(path.read_text(encoding="utf-8")))}


def set_facts(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("ansible.builtin.set_fact", "set_fact") and isinstance(value, dict):
                yield from value
            else:
                yield from set_facts(value)
    elif isinstance(node, list):
        for item in node:
            yield from set_facts(item)


def known_variables() -> set[str]:
    """Role variables, the facts roles publish, the inventories' variables, the values of `choices`
    (docker_source's `docker_ce`) and the app's settings (`redis_url`), which share the prefixes."""
    names: set[str] = set(Settings.model_fields)
    for role in ROLES:
        defaults = yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text(encoding="utf-8"))
        names |= set(defaults or {})
        specs = yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml").read_text(encoding="utf-8"))
        for entry in specs["argument_specs"].values():
            for name, option in entry.get("options", {}).items():
                names |= {name, *map(str, option.get("choices", []))}
        for path in (REPO / "roles" / role / "tasks").glob("*.yml"):
            names |= set(set_facts(yaml.safe_load(path.read_text(encoding="utf-8"))))
    for path in REPO.glob("inventories/*/group_vars/*/*"):
        if path.suffix in (".yml", ".example"):
            names |= set(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return names | {"pli_rolling_batch"}  # an extra variable of the app and gateway plays (README)


@pytest.mark.parametrize("path", documents())
def test_every_tag_a_document_names_is_defined(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    named = {tag for tags in re.findall(r"--tags[ =]([\w,-]+)", text) for tag in tags.split(",")}
    for line in re.findall(r"^Tags: (.*)$", text, flags=re.MULTILINE):
        named |= set(re.findall(r"`([\w-]+)`", line))
    assert named - defined_tags() == set()


@pytest.mark.parametrize("path", documents())
def test_every_role_variable_a_document_names_exists(path: Path) -> None:
    named = {span for span in code_spans(path.read_text(encoding="utf-8")) if VARIABLE.match(span)}
    assert named - known_variables() == set()


@pytest.mark.parametrize("path", documents())
def test_every_repository_path_a_document_names_exists(path: Path) -> None:
    """From the repository's root, or inside each role (the README's layout names `molecule/default/`)."""
    named = {span.split("#")[0] for span in code_spans(path.read_text(encoding="utf-8")) if REPO_PATH.match(span)}
    missing = {
        name
        for name in named
        if not (REPO / name).exists() and not all((REPO / "roles" / role / name).exists() for role in ROLES)
    }
    assert missing == set()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def app_commands(text: str) -> Iterator[list[str]]:
    """Each `python -m app …` command line in a document, as words, up to a pipe or the end of the line."""
    for line in re.findall(r"python -m app ([^`|\n]*)", text.replace("\\\n", " ")):
        yield line.split()


@pytest.mark.parametrize("path", documents())
def test_every_app_command_a_document_shows_exists_with_its_flags(path: Path) -> None:
    wrong: list[str] = []
    for words in app_commands(path.read_text(encoding="utf-8")):
        parser, used = build_parser(), []
        while words and (choices := subcommands(parser)) and words[0] in choices:
            used.append(words[0])
            parser = choices[words.pop(0)]
        if subcommands(parser) and not (words and words[0].startswith("--")):
            wrong.append(f"python -m app {' '.join(used)}: no such command {words[:1]}")
            continue
        flags = {flag for action in parser._actions for flag in action.option_strings}
        for word in words:
            if word.startswith("--") and word.split("=")[0] not in flags:
                wrong.append(f"python -m app {' '.join(used)}: no flag {word}")
    assert wrong == []


def test_the_checks_above_can_fail() -> None:
    """The patterns find what they look for (a document naming nothing would pass every check)."""
    runbook = (REPO / "docs" / "runbook.md").read_text(encoding="utf-8")
    assert {"app-keys", "app", "gateway"} <= set(re.findall(r"--tags[ =]([\w-]+)", runbook))
    assert "inference_app_drain_timeout_s" in set(code_spans(runbook))
    assert any(words[:2] == ["keys", "revoke"] for words in app_commands(runbook))
    assert "undefined-tag" not in defined_tags() and "inference_app_no_such_setting" not in known_variables()
