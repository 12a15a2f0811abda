#!/usr/bin/env python3
"""Regenerate the code workload of ``shortcut-eval practice --workload code``:
``code_prompts.jsonl``, ``code_edits.jsonl`` and ``code_families.jsonl``.

Every instance's content is real Python from the standard library of the running
CPython (function source and docstrings via :mod:`inspect` and :mod:`ast`, reference
text from :mod:`pydoc_data.topics`; PSF licence); only the request wordings below are
written here.

Kinds of request
----------------
* ``write-function``: "Write a Python function `name(signature)` that does the
  following: <first paragraph of its docstring>". Reference: the function's source.
* ``add-docstring``: "Add a docstring to this Python function ..." over a function's
  source with its docstring removed. Reference: the original source.
* ``list-comprehension``: "Convert this loop into a list comprehension ..." over a
  ``xs = []`` / ``for ...: [if ...:] xs.append(...)`` pair found in the library's source.
  Reference: the comprehension, built from the loop's syntax tree.
* ``unit-test``: "Write a unittest test case for this Python function ..." over a
  function's source. Reference: none.
* ``edit`` (several turns): turn 1 is a ``write-function`` or ``add-docstring`` request,
  the assistant's turn is its reference answer, and turn 2 asks for one change: rename
  the function, add a ``verbose`` parameter, or add error handling.
* Unpractised kinds (the ``novel`` split only): ``explain-function`` ("Explain in a few
  sentences what this Python function does") and ``explain-reference`` (a paragraph of
  the language reference to explain with a short example).

Files
-----
* ``code_families.jsonl``: the first five kinds as task families, ``PER_FAMILY``
  instances each; the first ``PRACTICE`` are ``split: "practice"``, the rest
  ``split: "transfer"``.
* ``code_prompts.jsonl``: ``PROMPTS_PRACTICE`` practice prompts (the four single-turn
  kinds in turn; other instances than the families') and ``PROMPTS_NOVEL`` novel prompts
  (the two unpractised kinds in turn).
* ``code_edits.jsonl``: for every practice prompt with a reference answer, one edit of
  that answer (``of`` = the practice prompt's id): the edit-of-an-earlier-answer test set.

Records: ``{"id", "prompt" or "messages", "source", "kind", "split", "reference"}`` (plus
``family`` in the family file, ``of`` and ``changes`` in the edits); ``source`` is
``cpython==<version>:Lib/<file>#L<line>`` or ``cpython==<version>:pydoc_data/topics.py#<key>``.

Usage::

    python shortcut_eval/data/extract_code.py [--out DIR]

The output depends on the library's source, so the script runs only under the CPython
version named in ``PYTHON`` (the files record it in ``source``); string-seeded
``random.Random`` instances make the output byte-identical across runs.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import platform
import random
import sys
import sysconfig
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True

from extract import write_jsonl  # noqa: E402

PYTHON = "3.11.7"
SEED = "code-1"
PER_FAMILY, PRACTICE = 32, 16
PROMPTS_PRACTICE, PROMPTS_NOVEL = 24, 24

#: standard-library folders not read: tests, GUI, tools and vendored code
SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
             "config-3.11-x86_64-linux-gnu", "__phello__", "pydoc_data", "venv", "distutils"}

INSTRUCTIONS = {
    "write-function": "Write a Python function `{name}{signature}` that does the following: {doc}",
    "add-docstring": "Add a docstring to this Python function. Reply with the whole function.\n\n"
                     "```python\n{code}\n```",
    "list-comprehension": "Convert this loop into a list comprehension.\n\n```python\n{code}\n```",
    "unit-test": "Write a unittest test case for this Python function.\n\n```python\n{code}\n```",
    "explain-function": "Explain in a few sentences what this Python function does.\n\n```python\n{code}\n```",
    "explain-reference": "Here is a passage from the Python language reference:\n\n{doc}\n\n"
                         "Explain it in plain words with a short example.",
}
#: turn-2 requests of an edit; ``{name}``/``{module}``/``{param}`` come from the function
EDITS = {
    "rename": "Rename the function to `{new_name}` and keep everything else the same.",
    "verbose": "Add a keyword-only parameter `verbose: bool = False`; when it is true, print the arguments "
               "before doing the work.",
    "error-handling": "Add error handling: raise a TypeError with a clear message when `{param}` is None.",
}
CODE_CHARS = 700  # a shown function or loop; keeps prompts well under 300 tokens
DOC_CHARS = (40, 320)


def src(path: str, line: int) -> str:
    """The ``source`` field of a line in ``Lib/<path>``."""
    return f"cpython=={PYTHON}:Lib/{path}#L{line}"


def library_files() -> list[tuple[str, str]]:
    """(path inside Lib/, source text) of every pure-Python standard-library module read."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIP_DIRS & set(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        files.append((relative.as_posix(), path.read_text(encoding="utf-8", errors="strict")))
    return files


def first_paragraph(doc: str) -> str:
    """A docstring's first paragraph on one line."""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def functions(files: list[tuple[str, str]]) -> list[dict]:
    """Public module-level functions with a docstring and a short body (no decorators,
    no generators)."""
    found, seen = [], set()
    for path, text in files:
        lines = text.splitlines()
        module = path[:-3].replace("/", ".").removesuffix(".__init__")
        for node in ast.parse(text).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
                continue
            doc = ast.get_docstring(node)
            if not doc or len(node.body) < 2 or any(isinstance(n, (ast.Yield, ast.YieldFrom))
                                                    for n in ast.walk(node)):
                continue
            code = "\n".join(lines[node.lineno - 1: node.end_lineno])
            first = node.body[0]
            bare = "\n".join(lines[node.lineno - 1: first.lineno - 1] + lines[first.end_lineno: node.end_lineno])
            summary = first_paragraph(doc)
            if (not 3 <= len(bare.splitlines()) <= 16 or len(code) > CODE_CHARS or "#" in bare
                    or not DOC_CHARS[0] <= len(summary) <= DOC_CHARS[1] or ">>>" in summary
                    or not summary[0].isupper() or "deprecated" in summary.lower() or bare in seen):
                continue
            seen.add(bare)  # some functions are copied between modules (ntpath, posixpath)
            # error handling is asked for a parameter without a default (None may be its default)
            params = (node.args.posonlyargs + node.args.args)[: -len(node.args.defaults) or None]
            found.append({"name": node.name, "module": module, "signature": f"({ast.unparse(node.args)})",
                          "doc": summary, "code": code, "bare": bare,
                          "param": params[0].arg if params else None, "source": src(path, node.lineno)})
    return found


def _comprehension(target: str, loop: ast.For) -> str | None:
    """``target = [...]`` equal to the loop, or ``None`` when the loop is not one append."""
    body, conditions = loop.body, []
    while len(body) == 1 and isinstance(body[0], ast.If) and not body[0].orelse:
        conditions.append(body[0].test)
        body = body[0].body
    if loop.orelse or len(body) != 1 or not isinstance(body[0], ast.Expr):
        return None
    call = body[0].value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "append"
            and isinstance(call.func.value, ast.Name) and call.func.value.id == target
            and len(call.args) == 1 and not call.keywords):
        return None
    comp = ast.ListComp(elt=call.args[0], generators=[
        ast.comprehension(target=loop.target, iter=loop.iter, ifs=conditions, is_async=0)])
    return f"{target} = {ast.unparse(comp)}"


def loops(files: list[tuple[str, str]]) -> list[dict]:
    """``xs = []`` followed by a loop that only appends to ``xs``, as it is in the source."""
    found, seen = [], set()
    for path, text in files:
        lines = text.splitlines()
        module = path[:-3].replace("/", ".").removesuffix(".__init__")
        for node in ast.walk(ast.parse(text)):
            body = getattr(node, "body", None)
            if not isinstance(body, list):
                continue
            for first, second in zip(body, body[1:]):
                if not (isinstance(first, ast.Assign) and len(first.targets) == 1
                        and isinstance(first.targets[0], ast.Name) and isinstance(first.value, ast.List)
                        and not first.value.elts and isinstance(second, ast.For)):
                    continue
                target = first.targets[0].id
                answer = _comprehension(target, second)
                if answer is None or len(answer) > 200:
                    continue
                code = textwrap.dedent("\n".join(lines[first.lineno - 1: second.end_lineno]))
                if "#" in code or len(code) > CODE_CHARS or code in seen:  # the same loop recurs in pydoc
                    continue
                seen.add(code)
                found.append({"name": target, "module": module, "code": code, "answer": answer,
                              "source": src(path, first.lineno)})
    return found


def reference_paragraphs() -> list[dict]:
    """First paragraph of each language-reference topic that reads as prose."""
    from pydoc_data.topics import topics

    found = []
    for key in sorted(topics):
        paragraphs = [" ".join(p.split()) for p in topics[key].split("\n\n")]
        text = next((p for p in paragraphs[1:] if 120 <= len(p) <= 420 and p[0].isupper()
                     and p.endswith(".") and "::=" not in p and "***" not in p), None)
        if text:
            found.append({"doc": text, "source": f"cpython=={PYTHON}:pydoc_data/topics.py#{key}"})
    return found


def request(kind: str, item: dict) -> str:
    """The request of ``kind`` about ``item`` (a function, loop or reference paragraph)."""
    if kind == "write-function":
        return INSTRUCTIONS[kind].format(name=item["name"], signature=item["signature"], doc=item["doc"])
    if kind == "add-docstring":
        return INSTRUCTIONS[kind].format(code=item["bare"])
    return INSTRUCTIONS[kind].format(**{k: v for k, v in item.items() if k in ("code", "doc")})


def answer(kind: str, item: dict) -> str | None:
    """The reference answer of a request, as a Markdown code block (``None``: none known)."""
    if kind in ("write-function", "add-docstring"):
        return f"```python\n{item['code']}\n```"
    if kind == "list-comprehension":
        return f"```python\n{item['answer']}\n```"
    return None


def record(kind: str, item: dict, split: str, number: int) -> dict:
    """A single-turn prompt record."""
    return {"id": f"code-{kind}-{number}", "prompt": request(kind, item), "source": item["source"], "kind": kind,
            "split": split, "reference": answer(kind, item)}


def edit(kind: str, item: dict, rng: random.Random) -> tuple[list[dict], str]:
    """The messages of an edit of ``item``'s answer and the edit's name."""
    names = [e for e in EDITS if e != "error-handling" or item["param"]]
    change = rng.choice(names)
    new_name = f"{item['module'].split('.')[-1]}_{item['name']}"
    text = EDITS[change].format(new_name=new_name, param=item["param"])
    return [{"role": "user", "content": request(kind, item)},
            {"role": "assistant", "content": answer(kind, item)},
            {"role": "user", "content": text}], change


def main(argv: list[str] | None = None) -> int:
    """Write the three files; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: next to this script)")
    args = parser.parse_args(argv)
    if platform.python_version() != PYTHON or platform.python_implementation() != "CPython":
        print(f"extract_code.py reads the standard library of CPython {PYTHON}; this is "
              f"{platform.python_implementation()} {platform.python_version()}", file=sys.stderr)
        return 2
    rng = random.Random(SEED)
    files = library_files()
    funcs, loop_items, refs = functions(files), loops(files), reference_paragraphs()
    for pool in (funcs, loop_items, refs):
        rng.shuffle(pool)
    need_funcs = 3 * PER_FAMILY + PER_FAMILY + 3 * (PROMPTS_PRACTICE // 4) + PROMPTS_NOVEL // 2
    need_loops = PER_FAMILY + PROMPTS_PRACTICE // 4
    if len(funcs) < need_funcs or len(loop_items) < need_loops or len(refs) < PROMPTS_NOVEL // 2:
        raise SystemExit(f"too few instances: {len(funcs)} functions (need {need_funcs}), {len(loop_items)} loops "
                         f"(need {need_loops}), {len(refs)} reference paragraphs (need {PROMPTS_NOVEL // 2})")
    take = {"functions": iter(funcs), "loops": iter(loop_items)}

    def items(kind: str, count: int) -> list[dict]:
        pool = take["loops" if kind == "list-comprehension" else "functions"]
        return [next(pool) for _ in range(count)]

    single = ("write-function", "add-docstring", "list-comprehension", "unit-test")
    families: list[dict] = []
    for kind in single:
        for number, item in enumerate(items(kind, PER_FAMILY)):
            split = "practice" if number < PRACTICE else "transfer"
            families.append({**record(kind, item, split, number), "family": kind})
    for number, item in enumerate(items("write-function", PER_FAMILY)):
        kind = ("write-function", "add-docstring")[number % 2]
        messages, change = edit(kind, item, random.Random(f"{SEED}-edit-{item['source']}"))
        families.append({"id": f"code-edit-{number}", "messages": messages, "source": item["source"],
                         "kind": "edit", "split": "practice" if number < PRACTICE else "transfer",
                         "reference": None, "family": "edit", "changes": [f"{kind}, then {change}"]})

    per_kind = {kind: items(kind, PROMPTS_PRACTICE // 4) for kind in single}
    prompts = [{**record(kind, per_kind[kind][n], "practice", n), "id": f"code-prompt-{kind}-{n}"}
               for n in range(PROMPTS_PRACTICE // 4) for kind in single]
    explain = items("explain-function", PROMPTS_NOVEL // 2)
    for n in range(PROMPTS_NOVEL // 2):
        prompts.append({**record("explain-function", explain[n], "novel", n), "id": f"code-novel-function-{n}",
                        "reference": None})
        prompts.append({"id": f"code-novel-reference-{n}", "prompt": request("explain-reference", refs[n]),
                        "source": refs[n]["source"], "kind": "explain-reference", "split": "novel",
                        "reference": None})
    edits = []
    for row in prompts:
        if row["split"] != "practice" or row["reference"] is None:
            continue
        kind, n = row["kind"], int(row["id"].rsplit("-", 1)[1])
        item = per_kind[kind][n]
        if kind == "list-comprehension":  # the answer is one statement: ask for a follow-up on it
            change = random.Random(f"{SEED}-edit-{row['id']}").choice(("generator", "sorted"))
            text = ("Now write it as a generator expression instead." if change == "generator"
                    else "Now also sort the resulting list.")
            messages = [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row["reference"]}, {"role": "user", "content": text}]
        else:
            messages, change = edit(kind, item, random.Random(f"{SEED}-edit-{row['id']}"))
        edits.append({"id": f"edit-{row['id']}", "of": row["id"], "messages": messages, "source": row["source"],
                      "changes": [change]})
    for name, rows in (("code_families.jsonl", families), ("code_prompts.jsonl", prompts),
                       ("code_edits.jsonl", edits)):
        path = args.out / name
        write_jsonl(path, rows)
        print(f"{path}: {len(rows)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
