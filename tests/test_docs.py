"""The operator's documents name only what exists: every tag a README or a doc tells you to run, every role
variable, every repository path and every `python -m app` command with its flags. A rename that leaves a
document behind fails here, not on an operator's first day."""

from __future__ import annotations

import argparse
import functools
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


def values_under(node: object, keys: tuple[str, ...]) -> Iterator[object]:
    """Every value of a key in `keys`, anywhere in a parsed YAML document (not below such a key)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys:
                yield value
            else:
                yield from values_under(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from values_under(item, keys)


def parsed(path: Path) -> object:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@functools.cache
def defined_tags() -> frozenset[str]:
    files = [REPO / "site.yml", *REPO.glob("playbooks/*.yml"), *REPO.glob("roles/*/tasks/*.yml")]
    tags = (value for path in files for value in values_under(parsed(path), ("tags",)))
    return frozenset(
        tag
        for value in tags
        for tag in ([value] if isinstance(value, str) else value if isinstance(value, list) else [])
    )


@functools.cache
def known_variables() -> frozenset[str]:
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
            facts = values_under(parsed(path), ("ansible.builtin.set_fact", "set_fact"))
            names |= {name for value in facts if isinstance(value, dict) for name in value}
    for path in REPO.glob("inventories/*/group_vars/*/*"):
        if path.suffix in (".yml", ".example"):
            names |= set(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return frozenset(names | {"pli_rolling_batch"})  # an extra variable of the app and gateway plays (README)


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
