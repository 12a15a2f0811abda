"""``shortcut-eval``: practice curves, quality guards and peers on real data.

Tasks:
  practice   a prompt stream practised for N rounds, then exact repeats, near-duplicates,
             transfer (unseen instances of practised task families) and novel prompts,
             beside plain generate, the memory-only ablation, assistant_early_exit (best
             of a sweep), prompt lookup decoding and the oracle exit bound
  agreement  teacher-forced next-token agreement and perplexity against the unwrapped
             model on text passages
  choice     multiple-choice accuracy by log-likelihood, wrapped against unwrapped

Every run writes ``results.json`` (every raw number and the environment), ``report.md``
and, for practice, ``practice_curve.png`` into ``--out`` (default
``runs/eval/<task>-<time>``); the folder appears only when the run finished.

    shortcut-eval practice --quick                 # < 10 min on a laptop CPU
    shortcut-eval practice                         # the full benchmark (30 prompts, 5 rounds, 64 tokens)
    shortcut-eval practice --workload code --model qwen2.5-coder-0.5b   # coding requests and edits
    shortcut-eval practice --skills A --compare B --rounds 0   # two skills folders, same test sets
    shortcut-eval agreement --skills A --mode fast
    shortcut-eval choice --skills A
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from shortcut.atomic import replace_folder
from shortcut.cli import INPUT_ERRORS, Parser, check_output_folder, integer, report_error
from shortcut.data import DEFAULT_PASSAGES, check_prompt_lengths, context_length, read_passages

from . import report, tasks
from .peers import default_early_exits
from .workload import DATA, DTYPES, WORKLOADS, System, load_system, prompt_sets, read_choices

TASKS = ("practice", "agreement", "choice")
QUICK = {  # option: (quick, full)
    "practice_prompts": (8, 30), "test_prompts": (6, 30), "rounds": (3, 5), "max_new_tokens": (32, 64),
    "sweep_prompts": (1, 3), "limit": (12, None), "family_prompts": (4, 16),
}


class UsageError(ValueError):
    """Options that contradict each other."""


def build_parser() -> argparse.ArgumentParser:
    """The ``shortcut-eval`` argument parser; the module doc is its help text."""
    parser = Parser(prog="shortcut-eval", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("task", choices=TASKS, help="what to measure")
    parser.add_argument("--model", default="smollm2",
                        help="alias (smollm2, gemma3-270m), local folder, .gguf or hub id")
    parser.add_argument("--skills", default=None, help="skills folder to start from (default: fresh skills)")
    parser.add_argument("--compare", default=None, help="a second skills folder measured beside --skills")
    parser.add_argument("--mode", choices=("lossless", "fast", "both"), default="lossless")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small run (< 10 min here) that still shows a curve")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/eval/<task>-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    practice = parser.add_argument_group("practice")
    practice.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                          help="committed prompts, near-duplicates/edits and task families: chat (the default: "
                               "instructions and trivia) or code (Python coding requests and edits of earlier "
                               "answers); see shortcut_eval/data/README.md")
    practice.add_argument("--prompts", type=Path, default=None,
                          help="JSONL with 'prompt' or 'messages'; 'split' practice/novel (instead of --workload)")
    practice.add_argument("--near", type=Path, default=None,
                          help="near-duplicates JSONL ('of' = a practised id); default: the workload's set "
                               "when --prompts is a committed workload's file")
    practice.add_argument("--families", default=None,
                          help="task-family JSONL ('family'; 'split' practice/transfer): practice instances join "
                               "the stream, unseen ones form the transfer set; default: the workload's families "
                               "when --prompts is a committed workload's file; none: off")
    practice.add_argument("--practice-prompts", type=integer(1), default=None,
                          help="prompts practised (quick 8, full 30)")
    practice.add_argument("--family-prompts", type=integer(1), default=None,
                          help="instances practised per family (quick 4, full 16)")
    practice.add_argument("--test-prompts", type=integer(1), default=None,
                          help="prompts per test set (quick 6, full 30)")
    practice.add_argument("--rounds", type=integer(0), default=None, help="practice rounds (quick 3, full 5)")
    practice.add_argument("--max-new-tokens", type=integer(1), default=None, help="quick 32, full 64")
    practice.add_argument("--early-exit", type=integer(1), nargs="*", default=None,
                          help="assistant_early_exit layers to sweep (default: 1/4, 1/2, 3/4 of the depth; none: off)")
    practice.add_argument("--sweep-prompts", type=integer(1), default=None, help="prompts for the early-exit sweep")
    practice.add_argument("--lookup-tokens", type=integer(0), default=10, help="prompt_lookup_num_tokens (0: off)")
    practice.add_argument("--corpus", type=Path, default=DEFAULT_PASSAGES,
                          help="JSONL of {'text'} for a fresh observer")
    practice.add_argument("--sae-steps", type=integer(1), default=1500, help="training steps of a fresh observer")
    practice.add_argument("--observer-layer", type=integer(0), default=None,
                          help="observer layer of fresh skills (default: the config's, n_layers // 12)")
    practice.add_argument("--exit-layers", type=integer(1), nargs="+", default=None,
                          help="candidate exits of fresh skills, above the observer (default: the config's)")
    quality = parser.add_argument_group("agreement and choice")
    quality.add_argument("--passages", type=Path, default=DEFAULT_PASSAGES,
                         help="JSONL of {'text'} (split 'heldout' used when present)")
    quality.add_argument("--data", type=Path, default=DATA / "choice.jsonl",
                         help="JSONL of {'question', 'choices', 'answer'}")
    quality.add_argument("--limit", type=integer(1), default=None,
                         help="at most this many passages/questions (quick 12)")
    quality.add_argument("--max-length", type=integer(2), default=256,
                         help="tokens per passage (at most the model's context)")
    return parser


def _resolve(args: argparse.Namespace) -> None:
    """Fill quick/full defaults and reject contradictions before anything slow runs."""
    for name, (quick, full) in QUICK.items():  # given values were range-checked by the parser
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.compare and not args.skills:
        raise UsageError("--compare needs --skills: it measures a second skills folder beside the first")
    if args.task == "practice" and args.rounds == 0 and not args.skills:
        raise UsageError("--rounds 0 needs --skills: fresh skills have learned nothing to measure")
    if (args.observer_layer is not None or args.exit_layers) and args.skills:
        raise UsageError("--observer-layer/--exit-layers shape fresh skills; a --skills folder brings its own")
    if args.task != "practice" and not args.skills:
        raise UsageError(f"{args.task} measures learned skills: give --skills DIR (see shortcut practice)")
    args.auto_early_exit = args.early_exit is None  # filled from the model depth once it is loaded
    if args.workload is not None and args.prompts is not None:
        raise UsageError(f"--workload {args.workload} and --prompts {args.prompts} both name the prompts; give one")
    if args.prompts is None:
        args.prompts = WORKLOADS[args.workload or "chat"][0]
    # a committed prompts file brings its workload's near-duplicates and families
    committed = next((files for files in WORKLOADS.values() if args.prompts.resolve() == files[0].resolve()), None)
    if args.near is None and committed:
        args.near = committed[1]
    if args.families is None:
        args.families = committed[2] if committed else None
    elif args.families.strip().lower() == "none":
        args.families = None
    else:
        args.families = Path(args.families)


def _check_skills(folder: str | None) -> None:
    from shortcut.skills.folder import read_manifest

    if folder is not None:
        read_manifest(Path(folder))


def _output_folder(args: argparse.Namespace) -> Path:
    out = check_output_folder(args.out or Path("runs") / "eval" / f"{args.task}-{time.strftime('%Y%m%d-%H%M%S')}",
                              "--out")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} already holds files; pass --overwrite to replace them")
    return out


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Check, load, measure, report; returns the result dict that ``results.json`` holds.

    Every option and input file is checked before the model loads, and everything that
    depends on the model (layer numbers, prompt lengths against its context) right after;
    the output folder is written only after that."""
    _resolve(args)
    out = _output_folder(args)
    _check_skills(args.skills)
    _check_skills(args.compare)
    if args.task == "practice":
        data = prompt_sets(args.prompts, args.near, n_practice=args.practice_prompts, n_test=args.test_prompts,
                           families=args.families, n_family=args.family_prompts)
        if not args.skills:
            read_passages(args.corpus)  # the fresh observer's training text
    elif args.task == "agreement":
        records = read_passages(args.passages)
        data = ([r for r in records if r.get("split") == "heldout"] or records)[: args.limit]
    else:
        data = read_choices(args.data)[: args.limit]

    started = time.perf_counter()
    systems = _load_systems(args)
    try:
        _check_against_model(args, systems[0], data)
        results: dict[str, Any] = {}

        def fill(tmp: Path) -> None:
            results.update(_measure(args, argv, systems, data, tmp, started))
            report.write(results, tmp)
            if out.exists() and any(out.iterdir()) and not args.overwrite:
                raise FileExistsError(f"--out {out} appeared during the run; pass --overwrite to replace it")

        replace_folder(out, fill)
        result = results
    finally:
        for system in systems:
            system.handle.remove()
    print(f"\nreport: {out / 'report.md'}  raw numbers: {out / 'results.json'}"
          + (f"  skills: {out / 'skills'}" if args.task == "practice" else ""))
    return result


def _load_systems(args: argparse.Namespace) -> list[System]:
    common = {"dtype": args.dtype, "seed": args.seed, "corpus": args.corpus, "sae_steps": args.sae_steps,
              "progress": not args.quiet, "observer_layer": args.observer_layer, "exit_layers": args.exit_layers}
    label = Path(args.skills).name if args.skills else "fresh"
    systems = [load_system(label, args.model, skills=args.skills, **common)]
    if args.compare:
        try:
            systems.append(load_system(Path(args.compare).name, args.model, skills=args.compare, **common))
        except BaseException:
            systems[0].handle.remove()
            raise
        if systems[1].label == systems[0].label:
            systems[1].label += " (2)"
    return systems


def _check_against_model(args: argparse.Namespace, system: System, data) -> None:
    """The checks that need the loaded model: early-exit layers within its depth, and
    every prompt, passage or question within its context."""
    layers = system.handle.num_layers
    if args.auto_early_exit:
        args.early_exit = default_early_exits(layers)
    elif args.task == "practice":
        bad = [e for e in args.early_exit if not 1 <= e < layers]
        if bad:
            raise ValueError(f"--early-exit {' '.join(map(str, bad))}: the model has {layers} layers; "
                             f"an early exit E must satisfy 1 <= E < {layers}")
    context = context_length(system.model, system.tokenizer)
    if context is None:
        return
    if args.task == "practice":
        for name, records in data.items():
            files = {"near-duplicates": args.near, "transfer": args.families}
            for family in (False, True):  # the practice stream mixes --prompts and --families records
                part = [r for r in records if ("family" in r) == family]
                source = args.families if family else files.get(name, args.prompts)
                check_prompt_lengths(system.tokenizer, part, max_new_tokens=args.max_new_tokens, context=context,
                                     option="--max-new-tokens", source=str(source))
    elif args.task == "agreement":
        if args.max_length > context:
            raise ValueError(f"--max-length {args.max_length} is more than the model's context of {context} tokens")
    else:
        for number, item in enumerate(data, start=1):
            for option, (question, answer) in zip(item["choices"], tasks.choice_sequences(system.tokenizer, item)):
                tokens = question.shape[1] + answer.shape[1]
                if tokens > context:
                    raise ValueError(f"{args.data}, question {item.get('id', number)!r} "
                                     f"with the choice {option[:40]!r} has {tokens} tokens, "
                                     f"more than the model's context of {context} tokens")


def _measure(args: argparse.Namespace, argv: list[str], systems: list[System], data, folder: Path,
             started: float) -> dict:
    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    if args.task == "practice":
        body = tasks.practice(args, systems, data, log)
        for system in systems:  # what was practised, for agreement/choice/finetune runs
            system.handle.save_pretrained(folder / ("skills" if len(systems) == 1 else f"skills-{system.label}"))
    elif args.task == "agreement":
        body = tasks.agreement(args, systems, data, log)
    else:
        body = tasks.choice(args, systems, data, log)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.task == "practice":
        settings["practice_prompts"] = len(data["practice"])
        settings["family_practice_prompts"] = sum("family" in r for r in data["practice"])
        settings["test_sets"] = {k: len(v) for k, v in data.items() if k != "practice"}
    result = {"task": args.task, "command": "shortcut-eval " + " ".join(argv), "settings": settings,
              "environment": report.environment(args.seed),
              "observer_train_seconds": {s.label: s.observer_seconds for s in systems},
              **body, "seconds": time.perf_counter() - started}
    print()
    if result.get("rounds"):
        print(report.table(result["rounds"]))
        print()
    print(report.table(result["tests"]))
    return result


def main(argv: list[str] | None = None) -> int:
    """Run ``shortcut-eval``; returns the exit status (expected errors are printed, not raised)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        run(args, argv)
    except (*INPUT_ERRORS, KeyError) as err:
        return report_error(f"shortcut-eval {args.task}", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
