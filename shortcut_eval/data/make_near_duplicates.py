#!/usr/bin/env python3
"""Make one reworded near-duplicate of every practice prompt.

Reads ``prompts.jsonl`` and writes ``near_duplicates.jsonl`` next to it (or the
paths given).  Each output line is::

    {"id": "nd-<practice id>", "of": "<practice id>", "prompt": "...",
     "changes": ["opener: ...", "punct: ...", "number: ..." | "synonym: ..."]}

Three deterministic rules are applied to every prompt, each driven by a
``random.Random`` seeded with ``SEED`` and the prompt id (string seeds are
hashed with SHA-512 by :mod:`random`, so the result does not depend on
``PYTHONHASHSEED`` or on the order of the input):

1. **Different opening words**: the prompt is prefixed with an opener such as
   "Please", "Could you ...", "Hey,", "Quick question:" (plain questions,
   prompts that open with an imperative verb, and other prompts each have their
   own opener list; an opener repeating the prompt's first word is not used).  The prompt's first letter is lower-cased when its first word is
   a common function word or verb (never for names or acronyms).
2. **Changed punctuation**: the final punctuation mark is changed
   (``?`` -> ``??`` or dropped, ``.`` -> ``!`` or dropped, none -> ``.``).
3. **One changed detail**: either one number is changed (+1..+3; ordinal
   suffixes follow) or one lower-case word outside quotes is replaced by a
   synonym from the committed table ``SYNONYMS``.  If a prompt has both, which
   kind is used is drawn from the seeded generator.

Pure standard library.  Usage::

    python shortcut_eval/data/make_near_duplicates.py [prompts.jsonl [near_duplicates.jsonl]]
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

SEED = 20240611

#: word -> synonym.  Small, hand-written, reviewed: each swap keeps the meaning.
SYNONYMS: dict[str, str] = {
    "answer": "reply",
    "argument": "case",
    "artist": "painter",
    "associated": "linked",
    "attach": "fasten",
    "biggest": "largest",
    "bubbly": "fizzy",
    "called": "named",
    "color": "colour",
    "common": "usual",
    "countries": "nations",
    "country": "nation",
    "create": "make",
    "created": "made",
    "describe": "portray",
    "detailed": "thorough",
    "different": "distinct",
    "explain": "clarify",
    "famous": "well-known",
    "film": "movie",
    "find": "locate",
    "formerly": "previously",
    "generate": "produce",
    "give": "provide",
    "group": "band",
    "happens": "occurs",
    "help": "assist",
    "humans": "people",
    "invented": "devised",
    "just": "only",
    "known": "recognized",
    "largest": "biggest",
    "least": "minimum",
    "located": "situated",
    "loudest": "noisiest",
    "made": "manufactured",
    "meaning": "significance",
    "movie": "film",
    "object": "item",
    "often": "frequently",
    "originally": "initially",
    "output": "reply",
    "paragraph": "passage",
    "performs": "plays",
    "possible": "feasible",
    "predecessor": "forerunner",
    "prove": "demonstrate",
    "rain": "shower",
    "response": "reply",
    "rewrite": "rephrase",
    "separated": "divided",
    "smallest": "tiniest",
    "song": "track",
    "stored": "kept",
    "story": "tale",
    "stripes": "bands",
    "swallow": "gulp down",
    "thin": "narrow",
    "tiny": "small",
    "type": "kind",
    "used": "utilized",
    "very": "extremely",
    "word": "term",
    "words": "terms",
    "write": "compose",
    "wrote": "composed",
}

QUESTION_OPENERS = [
    "Hey, {lc}",
    "Quick question: {lc}",
    "Could you answer this: {p}",
    "Please answer this: {p}",
    "I was wondering, {lc}",
]
#: for prompts that start with an imperative verb (see ``IMPERATIVES``)
IMPERATIVE_OPENERS = [
    "Please {lc}",
    "Hey, {lc}",
    "Could you help me with this? {p}",
    "Please do the following. {p}",
    "Here is a task for you: {p}",
]
#: for every other prompt (statements, constraints first, ...)
OTHER_OPENERS = [
    "Hey, {lc}",
    "Could you help me with this? {p}",
    "Please do the following. {p}",
    "Here is a task for you: {p}",
]
IMPERATIVES = set(
    """act alternate answer compare copy count create describe ensure explain find
    generate give include list maintain make name nest prove respond rewrite show
    talk tell use write""".split()
)
#: first words of a prompt ending in "?" that make it a plain question
QUESTION_STARTS = set(
    """according after are at before can could did do does for has have how in is
    on outside was were what when where which who whom whose why will would""".split()
)
#: first words that may be lower-cased after an opener
LOWERABLE = IMPERATIVES | set(
    """a according after an are at before can did do does each every for has have
    how if in is no on outside please the there this to was were what when where
    which who whom whose why will would your""".split()
)

_NUMBER = re.compile(r"(?<![\w.])(\d+)(-?(?:st|nd|rd|th))?(?![\w]|\.\d)")
_QUOTED = re.compile(
    r'"[^"]*"|\u201c[^\u201d]*\u201d|\u2018[^\u2019]*\u2019(?!\w)|(?<!\w)\'[^\']*\'(?!\w)'
)
_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)?")


def _ordinal(n: int, suffix: str) -> str:
    dash = "-" if suffix.startswith("-") else ""
    if 10 <= n % 100 <= 20:
        s = "th"
    else:
        s = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{dash}{s}"


def _opener(prompt: str, kind: str, rng: random.Random) -> tuple[str, str]:
    first = _WORD.match(prompt)
    first_word = first.group(0) if first else ""
    openers = {"question": QUESTION_OPENERS, "imperative": IMPERATIVE_OPENERS,
               "other": OTHER_OPENERS}[kind]
    openers = [o for o in openers if o.split()[0].strip(",:").lower() != first_word.lower()]
    template = rng.choice(openers)
    lc = prompt
    if first_word.lower() in LOWERABLE and first_word[1:] == first_word[1:].lower():
        lc = prompt[0].lower() + prompt[1:]
    out = template.format(p=prompt, lc=lc)
    return out, "opener: " + template.split("{")[0].strip()


def _punct(prompt: str, rng: random.Random) -> tuple[str, str]:
    end = prompt[-1]
    if end == "?":
        new = rng.choice(["", "??"])
        return prompt[:-1] + new, f"punct: '?' -> {new!r}"
    if end == ".":
        new = rng.choice(["", "!"])
        return prompt[:-1] + new, f"punct: '.' -> {new!r}"
    return prompt + ".", "punct: added '.'"


def _detail(prompt: str, rng: random.Random) -> tuple[str, str]:
    quoted = [m.span() for m in _QUOTED.finditer(prompt)]

    def outside(span: tuple[int, int]) -> bool:
        return not any(a <= span[0] < b for a, b in quoted)

    numbers = [m for m in _NUMBER.finditer(prompt) if outside(m.span())]
    words = [m for m in _WORD.finditer(prompt)
             if m.group(0) in SYNONYMS and outside(m.span())]
    kinds = [k for k, c in (("number", numbers), ("synonym", words)) if c]
    if not kinds:
        raise ValueError(f"no number and no table word in prompt: {prompt!r}")
    kind = rng.choice(kinds)
    if kind == "number":
        m = rng.choice(numbers)
        n = int(m.group(1))
        new_n = n + rng.choice([1, 2, 3])
        new = _ordinal(new_n, m.group(2)) if m.group(2) else str(new_n)
        if m.group(1).startswith("0") and len(m.group(1)) > 1:
            new = new.zfill(len(m.group(1)))
    else:
        m = rng.choice(words)
        new = SYNONYMS[m.group(0)]
    a, b = m.span()
    return prompt[:a] + new + prompt[b:], f"{kind}: {m.group(0)!r} -> {new!r}"


def near_duplicate(row: dict) -> dict:
    """Return the near-duplicate record of one prompt record."""
    rng = random.Random(f"{SEED}:{row['id']}")
    p = row["prompt"].strip()
    first = _WORD.match(p)
    if p.endswith("?") and first and first.group(0).lower() in QUESTION_STARTS:
        kind = "question"
    elif first and first.group(0).lower() in IMPERATIVES:
        kind = "imperative"
    else:
        kind = "other"
    p, c_detail = _detail(p, rng)
    p, c_punct = _punct(p, rng)
    p, c_open = _opener(p, kind, rng)
    return {"id": f"nd-{row['id']}", "of": row["id"], "prompt": p,
            "changes": [c_open, c_punct, c_detail]}


def make_all(prompts: list[dict]) -> list[dict]:
    """Near-duplicates of every prompt whose split is ``practice``, in file order."""
    out = [near_duplicate(r) for r in prompts if r["split"] == "practice"]
    originals = {r["prompt"] for r in prompts}
    for d in out:
        assert d["prompt"] not in originals, d
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    here = Path(__file__).resolve().parent
    src = Path(argv[0]) if argv else here / "prompts.jsonl"
    dst = Path(argv[1]) if len(argv) > 1 else src.with_name("near_duplicates.jsonl")
    with open(src, encoding="utf-8") as f:
        prompts = [json.loads(line) for line in f if line.strip()]
    rows = make_all(prompts)
    with open(dst, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(rows)} near-duplicates -> {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
