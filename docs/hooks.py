"""MkDocs hook: the configuration reference, rendered from the pydantic models at build time.

``mkdocs.yml`` registers this file under ``hooks:``. A page holding the line
``<!-- cloudburst:config-reference -->`` gets, in its place, one section per config (the
training job, the dataset job, the sweep, the ensemble request, the endpoint's settings) and
one per registered model family's ``model`` section. Each section is a table of every field
by its dotted key, with its type, default, bounds and description, all read from the models
themselves, so the page cannot drift from the code.

:func:`render` and :func:`field_paths` are importable on their own (``tests/test_docs.py``).
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = "<!-- cloudburst:config-reference -->"

_BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)


def _configs() -> list[tuple[str, str, type[BaseModel], str]]:
    """(title, anchor, model, where it is written) of every config the reference shows."""
    from cloudburst.config import DatasetJobConfig, TrainJobConfig
    from cloudburst.ensembles.request import EnsembleRequest
    from cloudburst.serving.settings import ServeSettings
    from cloudburst.tuning.config import SweepConfig

    return [
        (
            "Training job",
            "training-job",
            TrainJobConfig,
            "`jobs/train.py --config FILE key=value ...` (e.g. `jobs/configs/vae-demo.yaml`)",
        ),
        (
            "Dataset job",
            "dataset-job",
            DatasetJobConfig,
            "`jobs/ingest.py` and `jobs/demo.py --config FILE` (e.g. `jobs/configs/fraser.yaml`)",
        ),
        (
            "Sweep",
            "sweep",
            SweepConfig,
            "`jobs/sweep.py --config FILE` (e.g. `jobs/configs/sweep-vae-demo.yaml`)",
        ),
        (
            "Ensemble request",
            "ensemble-request",
            EnsembleRequest,
            "the JSON body of `POST /v1/ensembles`; `jobs/ensemble.py` builds the same request",
        ),
        (
            "Endpoint settings",
            "endpoint-settings",
            ServeSettings,
            "the `args` of the application in `jobs/configs/serve.yaml`",
        ),
    ]


def _families() -> list[tuple[str, type[BaseModel]]]:
    from cloudburst.models import registry

    return [(f.name, f.config) for f in registry.families()]


# ------------------------------------------------------------------------------ types


def _strip(annotation: Any) -> Any:
    """``annotation`` without ``Annotated`` wrappers."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _members(annotation: Any) -> list[Any]:
    annotation = _strip(annotation)
    if _is_union(annotation):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _section(annotation: Any) -> type[BaseModel] | None:
    """The one model a field holds (``X`` or ``X | None``), else None."""
    models = [m for m in _members(annotation) if m is not type(None)]
    if len(models) == 1 and _is_model(models[0]):
        return models[0]
    return None


def _nested(annotation: Any) -> Iterator[type[BaseModel]]:
    """Every model named anywhere inside ``annotation`` (lists, dicts, unions)."""
    annotation = _strip(annotation)
    if _is_model(annotation):
        yield annotation
        return
    if typing.get_origin(annotation) is Literal:
        return
    for arg in typing.get_args(annotation):
        yield from _nested(arg)


def _type(annotation: Any) -> str:
    """A short, readable spelling of a field's type."""
    annotation = _strip(annotation)
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(repr(a).replace("'", '"') for a in args)
    if _is_union(annotation):
        return " \\| ".join(_type(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type(args[0])}, ...]"
        return f"{name}[{', '.join(_type(a) for a in args)}]"
    if inspect.isclass(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


# ---------------------------------------------------------------------------- values


def _value(value: Any) -> str:
    """A value as it would be written in a config, in a code span."""
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, bool) or value is None:
        text = repr(value)
    elif isinstance(value, int) and value >= 2**32 and (value & (value - 1)) == 0:
        text = f"2**{value.bit_length() - 1}"
    elif isinstance(value, str | list | dict):
        text = json.dumps(value, default=str)
    else:
        text = repr(value)
    return f"`{text}`"


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        try:
            value = info.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel) and _section(info.annotation) is None:
            return _value(value.model_dump(exclude_unset=False))
        return _value(value)
    if info.default is PydanticUndefined:
        return "**required**"
    return _value(info.default)


def _bounds(info: FieldInfo) -> str:
    """ge / gt / le / lt, lengths and patterns from the field's metadata."""
    out: list[str] = []
    for item in info.metadata:
        for cls, attr, sign in _BOUNDS:
            if isinstance(item, cls):
                out.append(f"{sign} {_value(getattr(item, attr)).strip('`')}")
        if isinstance(item, annotated_types.MinLen):
            out.append(f"length >= {item.min_length}")
        if isinstance(item, annotated_types.MaxLen):
            out.append(f"length <= {item.max_length}")
        pattern = getattr(item, "pattern", None)
        if isinstance(pattern, str):
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def _cell(text: str) -> str:
    """``text`` on one line, its pipes escaped (a table cell)."""
    return re.sub(r"(?<!\\)\|", r"\\|", " ".join(text.split()))


def _doc(model: type[BaseModel]) -> str:
    """The first paragraph of a model's docstring, on one line."""
    doc = inspect.getdoc(model) or ""
    if doc == inspect.getdoc(BaseModel):
        return ""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "`")


# ---------------------------------------------------------------------------- tables


def _rows(
    model: type[BaseModel],
    prefix: str,
    extra: list[type[BaseModel]],
    special: dict[str, tuple[str, ...]] | None = None,
) -> Iterator[tuple[str, ...]]:
    """One row per field, nested sections flattened into dotted keys; models inside lists,
    dicts or unions are appended to ``extra`` (shown as tables of their own); a key of
    ``special`` gets that row instead."""
    special = special or {}
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        if key in special:
            yield special[key]
            continue
        section = _section(info.annotation)
        if section is not None and not (set(_members(info.annotation)) - {section, type(None)}):
            optional = type(None) in _members(info.annotation)
            kind = f"{section.__name__} section" + (" or None" if optional else "")
            yield (key, kind, _default(info), _bounds(info), info.description or _doc(section))
            yield from _rows(section, f"{key}.", extra, special)
            continue
        for inner in _nested(info.annotation):
            if inner not in extra:
                extra.append(inner)
        yield (
            key,
            _cell(_type(info.annotation)),
            _default(info),
            _bounds(info),
            info.description or "",
        )


# the training job's model union: one row here, each family's fields in a section of its own
_MODEL_ROW = {
    "model": (
        "model",
        "model family section",
        "`{kind: vae}`",
        "",
        "one registered family's section, told apart by `model.kind`: "
        "see [Model families](#model-families)",
    )
}


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    for key, kind, default, bounds, text in rows:
        lines.append(f"| `{key}` | {kind} | {default} | {bounds} | {_cell(text)} |")
    return lines


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model``, nested sections flattened (as the tables list them)."""
    return [row[0] for row in _rows(model, prefix, [])]


def _model_block(
    title: str, anchor: str, model: type[BaseModel], where: str, prefix: str = "", level: int = 2
) -> list[str]:
    hashes = "#" * level
    lines = [f"{hashes} {title} {{#{anchor}}}", ""]
    if where:
        lines += [f"Written as {where}; the model is `{model.__module__}.{model.__name__}`.", ""]
    doc = _doc(model)
    if doc:
        lines += [doc, ""]
    extra: list[type[BaseModel]] = []
    special = _MODEL_ROW if model.__name__ == "TrainJobConfig" else None
    lines += _table(list(_rows(model, prefix, extra, special))) + [""]
    seen: set[type[BaseModel]] = {model}
    while extra:
        inner = extra.pop(0)
        if inner in seen:
            continue
        seen.add(inner)
        name = inner.__name__
        lines += [f"{hashes}# {title}: `{name}` {{#{anchor}-{name.lower()}}}", ""]
        doc = _doc(inner)
        if doc:
            lines += [doc, ""]
        lines += _table(list(_rows(inner, "", extra))) + [""]
    return lines


def render() -> str:
    """The whole reference as Markdown."""
    lines: list[str] = []
    for title, anchor, model, where in _configs():
        lines += _model_block(title, anchor, model, where)
    lines += [
        "## Model families {#model-families}",
        "",
        "The training job's `model` section is one of these, chosen by `model.kind`; "
        "overrides reach it as `model.FIELD=VALUE`.",
        "",
    ]
    for name, config in _families():
        lines += _model_block(
            f"`model.kind: {name}`", f"model-{name}", config, "", prefix="model.", level=3
        )
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:  # noqa: ANN401
    """MkDocs event: put the generated reference where the page asks for it."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())


# Sphinx-style roles in docstrings (:func:`x`) render as ":func:" before the code span
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):(?=<code>)")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:  # noqa: ANN401
    """MkDocs event: drop the role prefixes of docstrings rendered by mkdocstrings."""
    return _ROLE.sub("", html)
