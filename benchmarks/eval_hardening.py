"""Old vs new ``cda2 eval`` worst case on the same samples and seed (issue 11).

Reads two ``robustness.json`` files - one written by the evaluation before issue 11 (adaptive
attacks soft(T=1), submodels, ppd-push, bpda, apgd-ce, apgd-dlr) and one by the current default
(scale-relative temperatures, the decision-margin attacks, the budget check, optionally the
AutoAttack row) - checks that they evaluated the same samples, and writes a JSON and a Markdown
table: every row of both runs, the budget-check and AutoAttack lines, and per radius the samples
the new worst case breaks that the old one did not (and, which must be none, the reverse).

    python benchmarks/eval_hardening.py OLD/robustness.json NEW/robustness.json \\
        --commands commands.json --out benchmarks/results/eval_hardening
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

WORST = "worst case (all attacks)"


def _load(path: str) -> Dict[str, Any]:
    return json.loads(Path(path).read_text())


def compare(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """Per model and radius: old and new worst case, and the samples each breaks that the other
    does not (``new_above_old`` lists samples robust in the new worst case but broken in the old)."""
    if old["indices"] != new["indices"]:
        raise SystemExit("the two evaluations ran on different samples (use the same --seed and --n-samples)")
    out: Dict[str, Any] = {}
    for model, rows in new["per_sample_robust"].items():
        o_rows = old["per_sample_robust"][model]
        per_eps = {}
        for e, bits in rows[WORST].items():
            o_bits = o_rows[WORST][e]
            idx = new["indices"]
            per_eps[e] = {
                "old_worst": old["robust_accuracy"][model][WORST][e],
                "new_worst": new["robust_accuracy"][model][WORST][e],
                "newly_broken": [idx[i] for i, (a, b) in enumerate(zip(o_bits, bits)) if a == "1" and b == "0"],
                "new_above_old": [idx[i] for i, (a, b) in enumerate(zip(o_bits, bits)) if a == "0" and b == "1"],
            }
        out[model] = per_eps
    return out


def _table(title: str, acc: Dict[str, Dict[str, float]], clean: float) -> List[str]:
    eps = sorted({e for r in acc.values() for e in r}, key=float)
    lines = [f"**{title}**", "", "| attack | clean | " + " | ".join(f"ε={e}" for e in eps) + " |",
             "|---|---:|" + "---:|" * len(eps)]
    for row, r in acc.items():
        cells = " | ".join("" if e not in r else f"{100 * r[e]:.1f}" for e in eps)
        lines.append(f"| {row} | {100 * clean:.1f} | {cells} |")
    return lines + [""]


def markdown(result: Dict[str, Any]) -> str:
    """The Markdown note: commands, both tables, the comparison and the new run's checks."""
    old, new = result["old"], result["new"]
    lines = ["# `cda2 eval` before and after issue 11 (same samples, same seed)", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    for name, cmd in result.get("commands", {}).items():
        lines += [f"- {name}: `{cmd}`"]
    lines.append("")
    for model in new["robust_accuracy"]:
        lines += _table(f"{model}: before (old attack set)", old["robust_accuracy"][model], old["clean"][model])
        lines += _table(f"{model}: after (new default)", new["robust_accuracy"][model], new["clean"][model])
        for e, c in result["comparison"][model].items():
            lines.append(f"- ε={e}: worst case {100 * c['old_worst']:.1f}% → {100 * c['new_worst']:.1f}%; "
                         f"newly broken test images {c['newly_broken'] or 'none'}; robust now but broken "
                         f"before: {c['new_above_old'] or 'none'}")
        lines.append("")
    lines += ["Checks printed by the new run:", ""] + [f"- {c}" for c in new["checks"]] + [""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old"), p.add_argument("new")
    p.add_argument("--commands", help="JSON {name: command line} of how the runs were made")
    p.add_argument("--note", help="a Markdown file whose text goes under the title (what the numbers say)")
    p.add_argument("--out", default="benchmarks/results/eval_hardening", help="path stem (.json, .md)")
    args = p.parse_args()
    old, new = _load(args.old), _load(args.new)
    keep = ("config", "n", "indices", "clean", "robust_accuracy", "per_sample_robust", "details", "checks",
            "seconds")
    result = {"commands": _load(args.commands) if args.commands else {},
              "note": Path(args.note).read_text().strip() if args.note else "",
              "comparison": compare(old, new),
              "old": {k: old[k] for k in keep if k in old}, "new": {k: new[k] for k in keep if k in new}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    bad = {m: {e: c["new_above_old"] for e, c in d.items() if c["new_above_old"]}
           for m, d in result["comparison"].items()}
    print(markdown(result))
    if any(bad.values()):
        raise SystemExit(f"the new worst case is above the old one on some samples: {bad}")


if __name__ == "__main__":
    main()
