"""Reports of ``shortcut-eval``: the terminal table, ``results.json``, ``report.md`` and,
for the practice task, ``practice_curve.png``."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

COLUMNS = [  # (key, header, format)
    ("speed_ratio", "speed x", "{:.2f}"),
    ("tokens_per_second", "tok/s", "{:.1f}"),
    ("bytes_rel", "bytes", "{:.2f}"),
    ("flops_rel", "flops", "{:.2f}"),
    ("call_flops_rel", "call flops", "{:.2f}"),
    ("mean_layers", "layers", "{:.1f}"),
    ("identical", "identical", "{:.0%}"),
    ("agreement", "agree", "{:.1%}"),
    ("acceptance", "accept", "{:.0%}"),
    ("recalled_share", "recalled", "{:.0%}"),
    ("learn_seconds", "learn s", "{:.1f}"),
    ("consolidate_seconds", "refit s", "{:.1f}"),
    ("perplexity", "ppl", "{:.3f}"),
    ("perplexity_ratio", "ppl x", "{:.4f}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("same_choice_as_unwrapped", "same pick", "{:.1%}"),
]


def environment(seed: int) -> dict[str, Any]:
    """Versions, CPU and threads: what a number depends on besides the code."""
    import transformers

    import shortcut

    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "transformers": transformers.__version__, "shortcut": shortcut.__version__}
    try:
        import sae_lens

        versions["sae_lens"] = getattr(sae_lens, "__version__", "?")
    except ImportError:
        pass
    return {"versions": versions, "platform": platform.platform(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "seed": seed}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return fmt.format(value)


def table(rows: list[dict], *, markdown: bool = False) -> str:
    """A table of ``rows`` with the columns any of them has."""
    if not rows:
        return ""
    lead = ["round"] if any("round" in r for r in rows) else []
    keys = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    headers = lead + ["set", "method"] + [h for _, h, _ in keys]
    body = [([str(r.get("round", ""))] if lead else []) + [r["set"], r["method"]]
            + [_cell(r, k, f) for k, _, f in keys] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    text_cols = len(lead) + 2
    fmt = lambda cells: "  ".join(c.ljust(w) if i < text_cols else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def markdown(result: dict) -> str:
    """The Markdown report: what ran, on what, and every table."""
    settings, env = result["settings"], result["environment"]
    lines = [f"# shortcut-eval {result['task']}", "",
             f"`{result['command']}`", "",
             f"Model `{settings['model']}` ({settings['dtype']}), skills `{settings.get('skills') or 'fresh'}`"
             + (f" vs `{settings['compare']}`" if settings.get("compare") else "")
             + f", mode {settings['mode']}, seed {settings['seed']}.",
             f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
             f"{env['processor']}, {env['torch_threads']} torch threads.", ""]
    if result["task"] == "practice":
        lines += [f"{settings['rounds']} practice rounds over {settings['practice_prompts']} prompts, greedy, "
                  f"{settings['max_new_tokens']} new tokens. Ratios are to plain `generate` of the same prompt in "
                  "the same run (medians over prompts); bytes and FLOPs per generated token relative to plain "
                  "decoding after the prefill, every layer, exit head, observer encode and verification counted; "
                  "call flops: the whole call, prefill included (prompt positions kept from earlier text are not "
                  "read again). The oracle is the "
                  "bound of a perfect exit policy with the current exit heads (no timing).", "",
                  "## Practice rounds", "", table(result["rounds"], markdown=True), "",
                  "## Test sets (skills frozen)", "", table(result["tests"], markdown=True), ""]
        ablation = ablation_table(result["tests"])
        if ablation:
            lines += ["## Sequence memory only vs full system (lossless)", "",
                      "The same frozen skills with the shallow path off (`lossless.shallow_drafts=False`: only "
                      "practised sequences draft, every other token takes the full path) beside the full system, "
                      "per test set. `transfer` holds unseen instances of the practised task families.", "",
                      ablation, ""]
        sweep = result.get("early_exit_sweep") or {}
        if sweep:
            lines += [f"`assistant_early_exit` sweep ({sweep['prompts']} prompts): "
                      + ", ".join(f"E={e}: {r:.2f}x" for e, r in sweep["speed_ratio_median"].items())
                      + f"; best E={sweep['best']} used above.", ""]
        if result.get("plot"):
            lines += [f"![practice curve]({result['plot']})", ""]
    else:
        lines += [table(result["tests"], markdown=True), ""]
    lines += [f"Wall time {result['seconds']:.0f} s. Raw numbers: `results.json`."]
    return "\n".join(lines) + "\n"


def ablation_table(tests: list[dict]) -> str:
    """Markdown table: each test set's full lossless row beside its memory-only row
    (speed ratio, FLOPs per token, recalled share); empty when there is no ablation row."""
    rows = {(r["set"], r["method"]): r for r in tests}
    lines = []
    for (set_name, method), memory in rows.items():
        if " memory only" not in method:
            continue
        full = rows.get((set_name, method.replace(" memory only", "")))
        if full is None:
            continue
        cells = [set_name, method.replace(" memory only", "")]
        for key, fmt in (("speed_ratio", "{:.2f}"), ("flops_rel", "{:.2f}"), ("recalled_share", "{:.0%}")):
            cells += [_cell(full, key, fmt), _cell(memory, key, fmt)]
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    header = ("| set | method | speed x full | speed x memory only | flops full | flops memory only "
              "| recalled full | recalled memory only |")
    return "\n".join([header, "|" + "|".join("---" for _ in range(8)) + "|", *lines])


def plot_practice(result: dict, path: Path) -> None:
    """Rounds on x; speed ratio and FLOPs per token on y; one line per method and set,
    peers (which do not practise) as dashed levels measured on the test sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds, tests = result["rounds"], result["tests"]
    fig, (speed_ax, flops_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors: dict[str, str] = {}  # one colour per method, the same in both panels

    def color(method: str) -> str:
        return colors.setdefault(method, palette[len(colors) % len(palette)])

    series: dict[tuple[str, str], list[dict]] = {}
    for row in rounds:
        series.setdefault((row["method"], row["set"]), []).append(row)
    for (method, set_name), rows in series.items():
        # Lossless rows are measured while practising; fast and oracle rows with the skills
        # as they are once the round was consolidated.
        when = "during the round" if method.startswith("shortcut lossless") else "after the round"
        x, label = [r["round"] for r in rows], f"{method} ({set_name}, {when})"
        if "speed_ratio" in rows[0]:
            speed_ax.plot(x, [r["speed_ratio"] for r in rows], marker="o", color=color(method), label=label)
        flops_ax.plot(x, [r["flops_rel"] for r in rows], marker="o", color=color(method), label=label)
    last = max((r["round"] for r in rounds), default=1)
    markers = {"exact repeats": "*", "near-duplicates": "^", "transfer": "D", "novel": "s"}
    offsets = {"exact repeats": 0.2, "near-duplicates": 0.3, "transfer": 0.4, "novel": 0.5}
    for row in tests:
        if not row["method"].startswith(("shortcut", "oracle")):
            continue
        style = {"marker": markers.get(row["set"], "x"), "s": 70, "color": color(row["method"]),
                 "label": f"{row['method']} ({row['set']}, frozen)"}
        x = [last + offsets.get(row["set"], 0.6) + 0.04 * (list(colors).index(row["method"]) % 3)]
        if "speed_ratio" in row:
            speed_ax.scatter(x, [row["speed_ratio"]], **style)
        flops_ax.scatter(x, [row["flops_rel"]], **style)
    styles = iter(["--", ":", "-."] * 4)
    for row in tests:
        if row["set"] == "exact repeats" and row["method"] != "plain" and not row["method"].startswith(
                ("shortcut", "oracle")):
            style = next(styles)
            label = f"{row['method']} (peer, exact repeats)"
            speed_ax.axhline(row["speed_ratio"], linestyle=style, color="gray", label=label)
            flops_ax.axhline(row["flops_rel"], linestyle=style, color="gray", label=label)
    flops_ax.set_yscale("log")
    speed_ax.axhline(1.0, color="black", linewidth=0.8)
    flops_ax.axhline(1.0, color="black", linewidth=0.8)
    speed_ax.set(xlabel="practice round", ylabel="tokens/s relative to plain generate", title="speed")
    flops_ax.set(xlabel="practice round", ylabel="FLOPs per generated token relative to plain", title="compute")
    for ax in (speed_ax, flops_ax):
        ax.set_xticks(range(1, last + 1))
        ax.grid(alpha=0.3)
    handles, labels = speed_ax.get_legend_handles_labels()
    more_h, more_l = flops_ax.get_legend_handles_labels()
    for h, label in zip(more_h, more_l):
        if label not in labels:
            handles.append(h)
            labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    settings = result["settings"]
    fig.suptitle(f"{settings['model']}: practice curve ({settings['practice_prompts']} prompts, "
                 f"{settings['max_new_tokens']} new tokens, greedy)")
    fig.tight_layout(rect=(0, 0.08 + 0.025 * (len(labels) // 3), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, folder: Path) -> None:
    """``results.json`` (every raw number), ``report.md`` and, for practice, the plot."""
    if result["task"] == "practice":
        plot_practice(result, folder / "practice_curve.png")
        result["plot"] = "practice_curve.png"
    (folder / "report.md").write_text(markdown(result))
    (folder / "results.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return float(value)
