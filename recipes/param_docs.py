"""What a recipe's ``Params`` offer, for ``biomtl recipes``: each field's name, type, default
and help, read from the dataclass itself. The help is the comment the field carries in its
source (the comment lines just above it, then the one at the end of its line), so the
documentation is the code's own and no list is kept by hand."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Any

__all__ = ["ParamDoc", "param_docs", "recipe_summary"]


@dataclass(frozen=True)
class ParamDoc:
    name: str
    type: str
    default: Any  # dataclasses.MISSING when required
    help: str
    start_only: bool  # read only to start a run (recipes.base.START_ONLY)


def _comments(cls: type) -> dict[int, str]:
    """``{line number in the class source: comment text}``."""
    lines, _ = inspect.getsourcelines(cls)
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _field_help(cls: type) -> dict[str, str]:
    lines, _ = inspect.getsourcelines(cls)
    comments = _comments(cls)
    tree = ast.parse(textwrap.dedent("".join(lines)))  # line numbers stay those of `lines`
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
    helps: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in comments and lines[row - 1].lstrip().startswith("#"):  # a whole-line comment block above
            above.insert(0, comments[row])
            row -= 1
        after = [comments[r] for r in range(node.lineno, (node.end_lineno or node.lineno) + 1)
                 if r in comments and not lines[r - 1].lstrip().startswith("#")]
        helps[node.target.id] = " ".join(above + after)
    return helps


def param_docs(params_cls: type) -> list[ParamDoc]:
    """The fields of a recipe's ``Params`` dataclass, in declaration order."""
    from recipes.base import START_ONLY

    helps = _field_help(params_cls)
    docs = []
    for f in dataclasses.fields(params_cls):
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        type_text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        docs.append(ParamDoc(f.name, type_text, default, helps.get(f.name, ""), bool(f.metadata.get(START_ONLY))))
    return docs


def recipe_summary(recipe_cls: type) -> str:
    """What a recipe trains: the first paragraph of its class docstring when it has its own,
    else of its module's, on one line."""
    doc = recipe_cls.__dict__.get("__doc__") or sys.modules[recipe_cls.__module__].__doc__ or ""
    first = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(first.split())
