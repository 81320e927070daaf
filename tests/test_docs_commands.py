"""The commands in README.md, BENCHMARKS.md and docs/ name scripts, flags and config fields that
exist: every benchmark script they name runs `--help` (so its imports resolve) and accepts each
flag given to it, every `python -m fdh_jax.main` flag is defined, every `--config=FILE` exists and
every `--config.FIELD` is a field of that config. The README's Python examples run in
tests/test_api.py and tests/test_serving.py."""

import ast
import functools
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, load_config

DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"python (-m fdh_jax\.main|benchmarks/\w+\.py)((?: [^`\n]*)?)")


def _commands() -> list[tuple[str, str, list[str]]]:
    """`(document, program, arguments)` of every command, `\\`-continued lines joined."""
    found = []
    for path in DOCS:
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        for match in COMMAND.finditer(text):
            words = shlex.split(match.group(2).replace("$", ""), comments=False, posix=True)
            found.append((path.name, match.group(1), words))
    return found


def _flag(word: str) -> str | None:
    """`--name=value` / `--name` -> `name`; placeholders (`--config.FIELD=VALUE`) -> None."""
    if not word.startswith("--") or word == "--":
        return None
    name = word[2:].split("=", 1)[0]
    return None if any(part.isupper() for part in name.split(".")) else name


@functools.cache
def _main_flags() -> set[str]:
    tree = ast.parse((REPO / "fdh_jax" / "main.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "").startswith("DEFINE"):
            names.add(node.args[0].value)
    return names | {"help", "helpfull"}


@functools.cache
def _help(script: str) -> str:
    done = subprocess.run(
        [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{script} --help failed:\n{done.stderr[-2000:]}"
    return done.stdout


def _config_fields(config, prefix: str = "") -> set[str]:
    fields = set()
    for key, value in config.items():
        fields.add(prefix + key)
        if hasattr(value, "items"):
            fields |= _config_fields(value, f"{prefix}{key}.")
    return fields


def _check_main(words: list[str]) -> list[str]:
    problems = []
    config_file = next((w.split("=", 1)[1] for w in words if w.startswith("--config=")), None)
    if config_file and config_file.isupper():  # a placeholder: --config=FILE
        config_file = None
    if config_file and not (REPO / config_file).is_file():
        return [f"--config={config_file}: no such file"]
    name = config_file.removeprefix("configs/").removesuffix(".py") if config_file else "default"
    fields = _config_fields(load_config(name))
    for word in words:
        flag = _flag(word)
        if flag is None:
            continue
        if flag.startswith("config."):
            if flag[len("config.") :] not in fields:
                problems.append(f"{word}: not a field of {config_file or 'configs/default.py'}")
        elif flag not in _main_flags():
            problems.append(f"{word}: not a flag of fdh_jax.main")
    return problems


def _check_script(script: str, words: list[str]) -> list[str]:
    mine, _, passed_on = " ".join(words).partition(" -- ")
    usage = _help(script)
    problems = [
        f"{script} {word}: not in its --help"
        for word in mine.split()
        if (flag := _flag(word)) and not re.search(rf"--{re.escape(flag)}\b", usage)
    ]
    return problems + _check_main(passed_on.split()) if passed_on else problems


def test_the_docs_hold_commands_of_both_kinds():
    programs = {program for _, program, _ in _commands()}
    assert "-m fdh_jax.main" in programs and len(programs) >= 8


@pytest.mark.parametrize(
    "document, program, words", _commands(), ids=lambda v: v if isinstance(v, str) else None
)
def test_documented_command_names_what_exists(document, program, words):
    if program == "-m fdh_jax.main":
        problems = _check_main(words)
    else:
        assert (REPO / program).is_file(), f"{document}: {program} does not exist"
        problems = _check_script(program, words)
    assert problems == [], f"{document}: python {program} {' '.join(words)}"


def test_the_checks_catch_a_wrong_flag_and_field():
    assert _check_main(["--config=configs/demo.py", "--no_such_flag=1"])
    assert _check_main(["--config=configs/demo.py", "--config.model.no_such_field=1"])
    assert _check_main(["--config=configs/demo.py", "--config.model.use_gnn=False"]) == []
    assert _check_script("benchmarks/seeds.py", ["--no_such_option=1"])
