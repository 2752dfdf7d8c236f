"""Every documented `engine.train` command runs as written: README.md, docs/, the --help text (conf/config.yaml),
conf/ and slurm/ comments, and engine/train.py's docstring.

Each command is taken as its user would paste it - code blocks and inline code, continuation lines joined - and
goes through what `python -m engine.train` does before it starts anything, in process: the command-line check
(did-you-mean, types, code-running Hydra overrides), Hydra's composition (each job of a `-m` sweep), the schema,
and every rule for its world size (torchrun/engine.launch's --nproc-per-node x --nnodes, sbatch's nodes x 8 GPUs,
or the layout a one-process command plans), with train.dry_run=true. The tokenizer the defaults point at
(runs/demo/tokenizer, what `make demo` writes) is a real one. A command documented as refused must be refused.
"""

from __future__ import annotations

import ast
import itertools
import re
import shlex
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from engine.config import ConfigError
from engine.train import CONF_DIR, command_line_problems, configuration_problems, to_config

REPO = Path(__file__).resolve().parent.parent
SBATCH_GPUS_PER_NODE = 8  # slurm/pretrain.sbatch's --gpus-per-node and --ntasks-per-node
SBATCH_NODES = 2
PLACEHOLDERS = ("<", "...", "[group=option", "[key=value", "[overrides]", "$")  # syntax, or a script's own
FENCE = "```"


def documents() -> list[Path]:
    """Where commands are documented."""
    return sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "conf").rglob("*.yaml"),
                   *(REPO / "slurm").glob("*.sbatch"), *(REPO / "slurm").glob("*.sh"), REPO / "engine" / "train.py"])


def logical_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(first line number, text) with backslash continuations joined."""
    out, start, parts = [], 0, []
    for n, line in enumerate(lines, 1):
        if not parts:
            start = n
        parts.append(line.rstrip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            out.append((start, " ".join(parts)))
            parts = []
    return out


def markdown_commands(text: str) -> list[tuple[int, str]]:
    """Commands in fenced code blocks, and inline code spans (which may wrap across lines) outside them."""
    out, block, prose = [], [], []
    lines = text.splitlines()
    in_code = False
    for n, line in enumerate(lines, 1):
        if line.strip().startswith(FENCE):
            if in_code:
                out += logical_lines_at(block)
                block = []
            in_code = not in_code
        elif in_code:
            block.append((n, line))
        else:
            prose.append((n, line))
    paragraph: list[tuple[int, str]] = []
    for n, line in [*prose, (0, "")]:
        if line.strip():
            paragraph.append((n, line))
            continue
        if paragraph:
            joined = " ".join(t for _, t in paragraph)
            out += [(paragraph[0][0], span) for span in re.findall(r"`([^`]+)`", joined)]
        paragraph = []
    return out


def logical_lines_at(numbered: list[tuple[int, str]]) -> list[tuple[int, str]]:
    first = numbered[0][0] if numbered else 0
    return [(first + n - 1, t) for n, t in logical_lines([t for _, t in numbered])]


def comment_commands(text: str) -> list[tuple[int, str]]:
    """Commands in comments, docstrings and YAML text: each line's leading '#' and indentation dropped."""
    return logical_lines([re.sub(r"^\s*#?\s?", "", line) for line in text.splitlines()])


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every documented command that runs engine.train."""
    found = []
    for doc in documents():
        text = doc.read_text() if doc.suffix != ".py" else ast.get_docstring(ast.parse(doc.read_text()))
        pairs = markdown_commands(text) if doc.suffix == ".md" else comment_commands(text)
        for n, command in pairs:
            command = command.strip()
            if re.search(r"(^|\s)(-m engine\.train|sbatch .*slurm/pretrain\.sbatch)(\s|$)", command) \
                    and not any(p in command for p in PLACEHOLDERS):
                found.append((f"{doc.relative_to(REPO)}:{n}", command))
    return found


COMMANDS = documented_commands()


def parse(command: str) -> tuple[list[str], int, bool]:
    """engine.train's arguments, the world size the command launches (1: plan it from the layout), and whether
    it is documented as refused."""
    refused = bool(re.search(r"#.*\brefused\b", command))
    tokens = shlex.split(command, comments=True)
    if "engine.train" in tokens:
        at = tokens.index("engine.train")
        launcher, args = tokens[:at], tokens[at + 1:]
        world = 1
        if any(t.endswith(("engine.launch", "torchrun")) for t in launcher):
            world = int(flag(launcher, "--nproc-per-node", "1")) * int(flag(launcher, "--nnodes", "1"))
        return args, world, refused
    at = next(i for i, t in enumerate(tokens) if t.endswith("slurm/pretrain.sbatch"))
    nodes = int(flag(tokens[:at], "--nodes", str(SBATCH_NODES)))
    return tokens[at + 1:], nodes * SBATCH_GPUS_PER_NODE, refused


def flag(tokens: list[str], name: str, default: str) -> str:
    """A command-line option's value, given as `name value` or `name=value`."""
    for i, t in enumerate(tokens):
        if t == name and i + 1 < len(tokens):
            return tokens[i + 1]
        if t.startswith(name + "="):
            return t.split("=", 1)[1]
    return default


def jobs(args: list[str]) -> list[list[str]]:
    """The overrides of each job: a `-m` sweep's product of comma-separated values, else the one job."""
    overrides = [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    if "-m" not in args and "--multirun" not in args:
        return [overrides]
    choices = [[f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")]
               if "," in a and not a.split("=", 1)[1].startswith("[") else [a] for a in overrides]
    return [list(job) for job in itertools.product(*choices)]


def problems_of(args: list[str], world: int) -> list[str]:
    """What `python -m engine.train args` on `world` ranks would refuse, as a dry run. A data.tokenizer that is an
    example path (/data/tokenizer.json) stands for the user's own: the demo's is read instead."""
    args = [a if not a.startswith("data.tokenizer=") or Path(a.split("=", 1)[1]).exists()
            else "data.tokenizer=runs/demo/tokenizer" for a in args]
    problems = command_line_problems(args)
    if problems:
        return problems
    for overrides in jobs(args):
        cfg = compose(config_name="config", overrides=[*overrides, "train.dry_run=true"])
        try:
            config = to_config(cfg)
        except ConfigError as e:
            return e.problems
        p = config.parallel
        ranks = world if world > 1 else p.tp * p.pp * (p.dp or 1)
        problems += configuration_problems(config, ranks, Path(config.train.run_dir))
    return problems


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    """A working directory where the defaults' runs/demo/tokenizer exists, as after `make demo`."""
    root = tmp_path_factory.mktemp("docs")
    (root / "runs" / "demo" / "tokenizer").mkdir(parents=True)
    shutil.copy(bpe_tokenizer, root / "runs" / "demo" / "tokenizer" / "tokenizer.json")
    return root


def test_the_documents_hold_the_commands_users_paste():
    """The extraction finds what it must (a silent miss would pass everything): the README's examples, the
    --help text's, the Slurm header's, and multi-line ones."""
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"README.md", "docs/training.md", "docs/parallelism.md", "docs/zero.md", "conf/config.yaml",
            "slurm/pretrain.sbatch", "engine/train.py"} <= where
    assert len(COMMANDS) >= 40
    assert any("parallel.pipeline_layers=[4,6,6,6]" in c and "train.dry_run=true" in c for _, c in COMMANDS)


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs_as_written(where, command, demo_dir, monkeypatch):
    args, world, refused = parse(command)
    monkeypatch.chdir(demo_dir)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        problems = problems_of(args, world)
    if refused:
        assert problems, f"{where}: documented as refused, but passes: {command}"
    else:
        assert not problems, f"{where}: {command}\n  " + "\n  ".join(problems)
