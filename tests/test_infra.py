"""The container images (infra/docker) against the project's pins, offline: the Dockerfiles
are parsed (no Docker daemon), and each check is also shown to fail on a broken copy."""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from cloudburst import environment

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "infra" / "docker"
FLAVOURS = ("cpu", "gpu")
REGISTRY = "ghcr.io/cloudburst-platform/cloudburst"
TORCH_INDEX = "https://download.pytorch.org/whl/"

# ------------------------------------------------------------------------ the Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined, comments inside them dropped
    line: int  # where it starts, 1-based


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order. A line ending in a backslash continues on the next one (the
    backslash and the line break are removed, as Docker does); comment lines and empty lines
    inside a continued instruction are dropped."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if parts and (not stripped or stripped.startswith("#")):
            continue  # inside a continuation
        if not parts:
            start = number
        if raw.rstrip().endswith("\\"):
            parts.append(raw.rstrip()[:-1])
            continue
        parts.append(raw)
        joined = "".join(parts).strip()
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    if parts:
        raise ValueError(f"line {start}: the file ends inside a continued instruction")
    return instructions


def shell_commands(args: str) -> list[list[str]]:
    """The simple commands of a RUN (shell or exec form), split at ``&&``, ``||``, ``;``."""
    if args.startswith("["):
        return [json.loads(args)]
    lexer = shlex.shlex(args, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


@dataclass(frozen=True)
class PipInstall:
    position: int  # index of its RUN among the instructions
    workdir: str
    requirements: list[str]  # positional arguments: requirement specifiers or paths
    options: dict[str, list[str]]  # option -> values given (flags: [""])


_PIP_VALUED = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url",
               "--extra-index-url", "-f", "--find-links", "-e", "--editable", "-t", "--target",
               "--prefix", "--root", "--platform", "--python-version"}  # fmt: skip


def pip_installs(instructions: list[Instruction]) -> list[PipInstall]:
    """Every ``pip install`` of the RUN instructions (also ``python -m pip install``)."""
    found = []
    workdir = "/"
    for position, ins in enumerate(instructions):
        if ins.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, ins.args)
        if ins.keyword != "RUN":
            continue
        for cmd in shell_commands(ins.args):
            words = list(cmd)
            if words[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
                words = words[2:]
            if words[:2] not in (["pip", "install"], ["pip3", "install"]):
                continue
            options: dict[str, list[str]] = {}
            requirements: list[str] = []
            rest = iter(words[2:])
            for word in rest:
                if word.startswith("-"):
                    name, eq, value = word.partition("=")
                    if not eq and name in _PIP_VALUED:
                        value = next(rest, "")
                    options.setdefault(name, []).append(value)
                else:
                    requirements.append(word)
            found.append(PipInstall(position, workdir, requirements, options))
    return found


def option(install: PipInstall, *names: str) -> list[str]:
    return [v for n in names for v in install.options.get(n, [])]


def copied(instructions: list[Instruction], before: int) -> dict[str, str]:
    """Source -> destination (normalised, ending in ``/``) of every COPY before instruction
    ``before``; relative destinations are resolved against the WORKDIR of the time."""
    out: dict[str, str] = {}
    workdir = "/"
    for ins in instructions[:before]:
        if ins.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, ins.args)
        if ins.keyword in {"COPY", "ADD"}:
            *sources, dest = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            target = posixpath.normpath(posixpath.join(workdir, dest)).rstrip("/") + "/"
            for src in sources:
                out[posixpath.normpath(src)] = target
    return out


# ---------------------------------------------------------------------- the project's pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def runtime_requirements() -> list[Requirement]:
    return [Requirement(r) for r in pyproject()["project"]["dependencies"]]


def pins() -> dict[str, str]:
    """Runtime dependency -> version, for those pinned exactly (``==``) in pyproject.toml."""
    out = {}
    for req in runtime_requirements():
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            out[canonicalize_name(req.name)] = exact[0]
    return out


def constraints(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            exact = [s.version for s in req.specifier if s.operator == "=="]
            if exact:
                out[canonicalize_name(req.name)] = exact[0]
    return out


# ------------------------------------------------------------------------------ the checks


def _base(instructions: list[Instruction]) -> str:
    froms = [i for i in instructions if i.keyword == "FROM"]
    return froms[-1].args.split()[0] if froms else ""


def check_base(instructions: list[Instruction], flavour: str) -> list[str]:
    """The final FROM is the official Ray image of the pinned Ray with the pinned Python."""
    image = _base(instructions)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|cu\d+)", image)
    if not m:
        return [f"FROM {image!r} is not rayproject/ray:VERSION-pyXY-(cpu|cuNNN)"]
    problems = []
    ray, major, minor, platform = m.groups()
    if ray != pins()["ray"]:
        problems.append(f"FROM has Ray {ray}, pyproject.toml pins ray=={pins()['ray']}")
    python = Version(f"{major}.{minor}")
    requires = pyproject()["project"]["requires-python"]
    if python != Version("3.11") or not Requirement(f"python{requires}").specifier.contains(python):
        problems.append(f"FROM has Python {python}; the project wants 3.11 ({requires})")
    if (platform == "cpu") != (flavour == "cpu"):
        problems.append(f"the {flavour} image is built on a {platform} base")
    return problems


def check_torch(instructions: list[Instruction], flavour: str) -> list[str]:
    """torch alone, first, from its exact pin, on the wheel index of the base's platform."""
    installs = pip_installs(instructions)
    if not installs:
        return ["no pip install at all"]
    first = installs[0]
    problems = []
    want = f"torch=={pins()['torch']}"
    if first.requirements != [want]:
        problems.append(f"the first pip install is {first.requirements}, not [{want!r}] alone")
    platform = _base(instructions).rsplit("-", 1)[-1]
    index = option(first, "-i", "--index-url")
    if index != [f"{TORCH_INDEX}{platform}"]:
        problems.append(f"torch comes from {index}, not the {platform} wheel index")
    if option(first, "--extra-index-url", "-f", "--find-links"):
        problems.append("torch's install has other indexes beside its own")
    later = [i for i in installs[1:] if any(r.startswith("torch") for r in i.requirements)]
    if later:
        problems.append("torch is installed again later")
    return problems


def check_project(instructions: list[Instruction]) -> list[str]:
    """After torch, the project itself, not editable, with the constraints file that was
    copied beside it; nothing else is installed."""
    installs = pip_installs(instructions)
    projects = [i for i in installs if "." in i.requirements or option(i, "-e", "--editable")]
    if len(projects) != 1:
        return [f"expected one install of the project ('.'), found {len(projects)}"]
    project = projects[0]
    problems = []
    if installs.index(project) == 0:
        problems.append("the project is installed before torch")
    if option(project, "-e", "--editable"):
        problems.append("the project is installed editable")
    if option(project, "--no-deps"):
        problems.append("the project is installed without its dependencies")
    if project.requirements != ["."]:
        problems.append(f"the project's install also names {project.requirements}")
    if option(project, "-c", "--constraint") != ["constraints.txt"]:
        problems.append("the project is not installed with -c constraints.txt")
    if option(project, "-i", "--index-url", "--extra-index-url", "-f", "--find-links"):
        problems.append("the project's install changes the package index")
    here = copied(instructions, project.position)
    workdir = posixpath.normpath(project.workdir).rstrip("/") + "/"
    for name in ("constraints.txt", "pyproject.toml", "README.md"):
        if here.get(name) != workdir:
            problems.append(f"{name} is not copied into {workdir} before the project's install")
    if here.get("platform") != f"{workdir}platform/":
        problems.append(f"platform/ is not copied to {workdir}platform/ before the install")
    others = [i for i in installs if i is not project and i is not installs[0]]
    if others:
        problems.append(f"other pip installs: {[o.requirements for o in others]}")
    return problems


def check_jobs(instructions: list[Instruction]) -> list[str]:
    """The final WORKDIR holds jobs/ (``python jobs/train.py ...`` works there)."""
    workdirs = [i.args for i in instructions if i.keyword == "WORKDIR"]
    if not workdirs:
        return ["no WORKDIR"]
    final = posixpath.normpath(posixpath.join("/", *workdirs)).rstrip("/") + "/"
    if copied(instructions, len(instructions)).get("jobs") != f"{final}jobs/":
        return [f"jobs/ is not copied to {final}jobs/"]
    return []


def check_user(instructions: list[Instruction]) -> list[str]:
    users = [i.args.split(":")[0] for i in instructions if i.keyword == "USER"]
    if not users:
        return ["no USER: the image would run as its base's user"]
    if users[-1] in {"root", "0"}:
        return [f"the final USER is {users[-1]}"]
    return []


SECRET_WORDS = {"PASSWORD", "PASSWD", "SECRET", "SECRETS", "TOKEN", "KEY", "APIKEY",
                "CREDENTIAL", "CREDENTIALS", "PRIVATE"}  # fmt: skip
SECRET_VALUES = re.compile(
    r"password|passwd|secret|token|api[_-]?key|private[_-]?key|-----BEGIN|AKIA[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,}|xox[abprs]-",
    re.IGNORECASE,
)


def variables(instructions: list[Instruction]) -> list[tuple[str, str, str]]:
    """(keyword, name, value) of every ARG and ENV (value '' for an ARG without default)."""
    out = []
    for ins in instructions:
        if ins.keyword not in {"ARG", "ENV"}:
            continue
        words = shlex.split(ins.args)
        if ins.keyword == "ENV" and words and "=" not in words[0]:
            out.append(("ENV", words[0], " ".join(words[1:])))  # ENV NAME value
            continue
        for word in words:
            name, _, value = word.partition("=")
            out.append((ins.keyword, name, value))
    return out


def check_secrets(instructions: list[Instruction]) -> list[str]:
    problems = []
    for keyword, name, value in variables(instructions):
        if set(re.split(r"[_\-]", name.upper())) & SECRET_WORDS:
            problems.append(f"{keyword} {name}: the name looks like a secret's")
        if SECRET_VALUES.search(value):
            problems.append(f"{keyword} {name}: the value looks like a secret")
    for ins in instructions:
        if ins.keyword == "RUN" and re.search(r"\w*(SECRET|TOKEN|PASSWORD)\w*=", ins.args, re.I):
            problems.append(f"line {ins.line}: RUN sets a secret-looking variable")
    return problems


def check_env_defaults(instructions: list[Instruction]) -> list[str]:
    """ENV holds Cloudburst's defaults of the scopes every process takes (environment.py),
    and none of the loopback-only ones (token auth off, Serve on loopback, no metadata)."""
    env = {name: value for kw, name, value in variables(instructions) if kw == "ENV"}
    wanted = environment.defaults(environment.IMPORT, environment.PROGRAM)
    problems = [
        f"ENV {name}={env.get(name)!r}, environment.py's default is {value!r}"
        for name, value in wanted.items()
        if env.get(name) != value
    ]
    local = environment.defaults(environment.LOCAL, environment.EMULATOR)
    problems += [f"ENV {name}: a loopback-only default" for name in local if name in env]
    return problems


def check_dockerfile(text: str, flavour: str) -> list[str]:
    instructions = parse_dockerfile(text)
    return [
        *check_base(instructions, flavour),
        *check_torch(instructions, flavour),
        *check_project(instructions),
        *check_jobs(instructions),
        *check_user(instructions),
        *check_secrets(instructions),
        *check_env_defaults(instructions),
    ]


# ------------------------------------------------------------------------ the .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: the last pattern that
    matches it or a folder above it decides (``!`` patterns bring paths back)."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:].strip() if negate else raw
        regex = _pattern_regex(pattern.strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def dockerignore_patterns(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


NEEDED = ["pyproject.toml", "constraints.txt", "README.md", "platform/cloudburst/__init__.py",
          "jobs/train.py", "jobs/_common.py", "jobs/configs/vae-demo.yaml"]  # fmt: skip
LEFT_OUT = [".venv/bin/python", "outputs/mlflow/mlflow.db", ".git/HEAD",
            "platform/cloudburst/__pycache__", "jobs/__pycache__/_common.cpython-311.pyc",
            ".pytest_cache/v/cache/lastfailed"]  # fmt: skip


def check_dockerignore(text: str) -> list[str]:
    patterns = dockerignore_patterns(text)
    problems = [f"{p} is sent to the builder" for p in LEFT_OUT if not ignored(patterns, p)]
    problems += [f"{p} is left out, the image needs it" for p in NEEDED if ignored(patterns, p)]
    return problems


# ----------------------------------------------------------------------------------- tests


def dockerfile(flavour: str) -> str:
    return (DOCKER / f"Dockerfile.{flavour}").read_text()


def test_the_parser_joins_continuations_and_drops_comments_inside_them():
    text = (
        "# top\nFROM base:1\n\nRUN pip install \\\n    # why\n    torch==1 \\\n\n"
        "  && echo ok\nUSER ray\n"
    )
    parsed = parse_dockerfile(text)
    assert [(i.keyword, i.line) for i in parsed] == [("FROM", 2), ("RUN", 4), ("USER", 9)]
    assert shell_commands(parsed[1].args) == [["pip", "install", "torch==1"], ["echo", "ok"]]
    with pytest.raises(ValueError, match="ends inside"):
        parse_dockerfile("RUN a \\\n")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dockerfile_meets_the_pins(flavour):
    assert check_dockerfile(dockerfile(flavour), flavour) == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_base_image_is_rays_of_the_pinned_version(flavour):
    base = _base(parse_dockerfile(dockerfile(flavour)))
    assert base.startswith(f"rayproject/ray:{pins()['ray']}-py311-")
    assert base.endswith("-cpu") == (flavour == "cpu")


def test_gpu_image_takes_torch_of_the_base_images_cuda():
    instructions = parse_dockerfile(dockerfile("gpu"))
    cuda = _base(instructions).rsplit("-", 1)[-1]
    assert re.fullmatch(r"cu\d{3}", cuda)
    assert option(pip_installs(instructions)[0], "--index-url") == [f"{TORCH_INDEX}{cuda}"]


def test_constraints_satisfy_every_runtime_dependency():
    """What the project install resolves to (-c constraints.txt) meets pyproject.toml: every
    runtime dependency has a pinned version in the constraints that its specifier admits,
    and the exact pins are the same versions."""
    pinned = constraints((ROOT / "constraints.txt").read_text())
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (req, pinned[name])
    assert all(pinned[name] == version for name, version in pins().items())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_build_command_in_the_header_names_the_charts_image(flavour):
    version = pyproject()["project"]["version"]
    header = dockerfile(flavour).split("\nFROM", 1)[0].replace("\\\n#", "")
    assert f"-f infra/docker/Dockerfile.{flavour}" in header
    assert f"-t {REGISTRY}:{version}-{flavour} ." in " ".join(header.split())
    readme = " ".join((ROOT / "infra" / "README.md").read_text().replace("\\\n", "").split())
    assert f"-f infra/docker/Dockerfile.{flavour} -t {REGISTRY}:{version}-{flavour} ." in readme


def test_dockerignore_leaves_out_venv_outputs_and_caches_but_not_the_sources():
    assert check_dockerignore((ROOT / ".dockerignore").read_text()) == []


# each check fails on a copy broken the way it guards against: (flavour, old, new, problem);
# an empty ``old`` appends ``new`` at the end
BROKEN = [
    ("cpu", "ray:2.60.0-py311", "ray:2.59.0-py311", "pyproject.toml pins ray==2.60.0"),
    ("cpu", "-py311-cpu", "-py310-cpu", "wants 3.11"),
    ("gpu", "-py311-cu128", "-py311-cpu", "built on a cpu base"),
    ("cpu", "torch==2.13.0", "torch==2.12.0", "alone"),
    ("cpu", "torch==2.13.0\n", "torch==2.13.0 numpy\n", "alone"),
    ("gpu", "whl/cu128", "whl/cu126", "not the cu128 wheel index"),
    ("cpu", "whl/cpu torch", "whl/cpu --extra-index-url https://pypi.org/simple torch", "other"),
    ("cpu", "-c constraints.txt .", "-c other.txt .", "not installed with -c constraints.txt"),
    ("cpu", "-c constraints.txt .", ".", "not installed with -c constraints.txt"),
    ("cpu", "-c constraints.txt .", "-c constraints.txt -e .", "editable"),
    ("cpu", "-c constraints.txt .", "-c constraints.txt --no-deps .", "without its dependencies"),
    ("cpu", "pyproject.toml constraints.txt", "pyproject.toml", "constraints.txt is not copied"),
    ("gpu", "COPY --chown=1000:100 platform ./platform", "", "platform/ is not copied"),
    ("cpu", "", "RUN pip install mlflow==3.18.0\n", "other pip installs"),
    ("gpu", "jobs ./jobs", "jobs /opt/jobs", "jobs/ is not copied"),
    ("cpu", "", "USER root\n", "final USER is root"),
    ("gpu", "", "USER 0:0\n", "final USER is 0"),
    ("cpu", "ENV ", "ARG GITHUB_TOKEN\nENV ", "ARG GITHUB_TOKEN: the name"),
    ("cpu", "ENV ", "ENV AWS_SECRET_ACCESS_KEY=abc123\nENV ", "AWS_SECRET_ACCESS_KEY: the name"),
    ("gpu", "ENV ", "ENV HF_HOME=ghp_abcdefghijklmnopqrstuvwx1234\nENV ", "HF_HOME: the value"),
    ("cpu", "", "RUN DB_PASSWORD=hunter2 true\n", "RUN sets a secret-looking variable"),
    ("cpu", "    DO_NOT_TRACK=1", "    DO_NOT_TRACK=0", "DO_NOT_TRACK='0'"),
    ("cpu", "    DO_NOT_TRACK=1", "    DO_NOT_TRACK=1 RAY_AUTH_MODE=disabled", "loopback-only"),
]


@pytest.mark.parametrize(("flavour", "old", "new", "problem"), BROKEN)
def test_a_broken_dockerfile_is_refused(flavour, old, new, problem):
    text = dockerfile(flavour)
    assert old in text  # the break really applies to today's file
    broken = text.replace(old, new, 1) if old else text + new
    assert broken != text
    problems = check_dockerfile(broken, flavour)
    assert any(problem in p for p in problems), problems


def test_a_dockerfile_without_user_is_refused():
    text = dockerfile("cpu").replace("USER ray\n", "")
    assert check_user(parse_dockerfile(text)) == ["no USER: the image would run as its base's user"]


def test_torch_after_the_project_is_refused():
    text = dockerfile("cpu")
    torch = next(ln for ln in text.splitlines() if "torch==" in ln and ln.startswith("RUN"))
    moved = text.replace(torch + "\n", "") + torch + "\n"
    problems = check_dockerfile(moved, "cpu")
    assert any("before torch" in p for p in problems), problems


@pytest.mark.parametrize("dropped", [".venv", "outputs", "**/__pycache__"])
def test_a_dockerignore_missing_an_exclusion_is_refused(dropped):
    text = (ROOT / ".dockerignore").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() != dropped]
    assert len(lines) < len(text.splitlines())
    assert check_dockerignore("\n".join(lines)) != []


def test_a_dockerignore_leaving_out_the_sources_is_refused():
    text = (ROOT / ".dockerignore").read_text()
    assert any("jobs/" in p for p in check_dockerignore(text + "\njobs\n"))
    assert any("constraints.txt" in p for p in check_dockerignore(text + "\n*.txt\n"))
    assert check_dockerignore(text + "\n*.txt\n!constraints.txt\n") == []
