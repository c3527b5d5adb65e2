"""`prefalign audit DATA [--model M]`: what is wrong with a preference data set, before training on it.

Reads any source the data layer reads, validates it with on_bad_row="skip" (bad rows are reported
with their reasons, not fatal), and runs the checks of docs/audit.md: length bias, exact and near
duplicates, identical chosen/rejected, contradictory pairs, truncation at --max-length (with a
tokenizer), style markers over-represented in chosen, and with --model the reference's margins
(too-easy pairs, share already ranked correctly). Findings are warnings whose thresholds are flags;
the only error (exit 2) is input that cannot be read at all.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, fields

from prefalign import audit_checks as ac
from prefalign.data.formats import load_examples, place
from prefalign.errors import UserError
from prefalign.validation import add_ranged, check_output_file, path_arg


@dataclass
class Thresholds:
    """When a finding becomes a warning. Each is a CLI flag (--length-share, ...)."""
    length_share: float = 0.6        # paired: warn if chosen is longer in >= this share (or <= 1 - this) of pairs...
    alpha: float = 0.05              # ...and the sign test's p-value is below alpha
    length_corr: float = 0.3         # unpaired: warn if |point-biserial(length, label)| >= this
    min_pairs: int = 10              # no length or style warning on fewer examples than this
    near_dup: float = 0.8            # near duplicates: every field's character-5-gram Jaccard >= this
    style_ratio: float = 2.0         # warn if rate(chosen) / rate(rejected) >= this or <= 1/this...
    style_min_count: int = 5         # ...and at least this many pairs (responses, unpaired) differ on the marker
    easy_k: float = 3.0              # too easy: reference margin > median + easy_k * 1.4826 * MAD
    max_easy_share: float = 0.05     # warn if more pairs than this share are too easy
    max_ref_correct: float = 0.9     # warn if the reference already ranks more than this share correctly
    max_skipped: float = 0.0         # warn if more than this share of rows fail validation
    max_duplicates: float = 0.0      # ... are exact (or, separately, near) duplicates beyond the first copy
    max_identical: float = 0.0       # ... have chosen == rejected (exactly or after normalization)
    max_contradictions: float = 0.0  # ... take part in a contradiction
    max_truncated: float = 0.0       # ... are truncated (or dropped) at --max-length


# The documented range of each threshold (validation.Range specs, shown in the flags' help; each
# also refuses nan and inf, which would silence or always raise its warning).
THRESHOLD_RANGES = {
    "length_share": "[0.5, 1]", "alpha": "(0, 1)", "length_corr": "[0, 1]", "min_pairs": ">= 0",
    "near_dup": "(0, 1]", "style_ratio": ">= 1", "style_min_count": ">= 0", "easy_k": "finite",
    "max_easy_share": "[0, 1]", "max_ref_correct": "[0, 1]", "max_skipped": "[0, 1]", "max_duplicates": "[0, 1]",
    "max_identical": "[0, 1]", "max_contradictions": "[0, 1]", "max_truncated": "[0, 1]",
}


def _read_rejects(path: str, max_listed: int) -> tuple[list[dict], Counter, int]:
    """(listed skipped rows, count by field, count of identical chosen/rejected) from a rejects file."""
    listed, by_field, identical = [], Counter(), 0
    if not os.path.exists(path):
        return listed, by_field, identical
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rest = r["reason"][len(place(r["source"], r["row"])):]
            field = None
            if rest.startswith(", field '"):
                field, _, rest = rest[len(", field '"):].partition("'")
            reason = rest.removeprefix(": ")
            by_field[field or "(row)"] += 1
            identical += reason == "chosen and rejected are identical"
            if len(listed) < max_listed:
                listed.append({"row": r["row"], "field": field, "reason": reason})
    return listed, by_field, identical


def _load(data: str, kind: str, split: str, max_listed: int):
    with tempfile.TemporaryDirectory() as tmp:
        rejects = os.path.join(tmp, "rejects.jsonl")
        try:
            loaded = load_examples(data, kind=kind, on_bad_row="skip", rejects_path=rejects, split=split)
            examples, found = loaded.examples, loaded.kind
        except UserError:
            if not os.path.exists(rejects):  # unreadable as a whole: the one error the audit raises
                raise
            examples, found = [], None  # readable, but every row was bad: that is a finding
        listed, by_field, identical = _read_rejects(rejects, max_listed)
        skipped = sum(by_field.values())
    return examples, found, {"rows": len(examples) + skipped, "loaded": len(examples), "skipped": skipped,
                             "skipped_by_field": dict(by_field), "skipped_identical": identical,
                             "skipped_rows": listed}


def _rows(examples, indices, max_listed):
    return [examples[i].row for i in indices][:max_listed]


def _duplicates(examples, exact_keys, near_fields, th: Thresholds, max_listed: int, near_max_rows: int) -> dict:
    groups = ac.exact_groups(exact_keys)
    exact = {"groups": len(groups), "extra_rows": sum(len(g) - 1 for g in groups),
             "examples": [[examples[i].row for i in g] for g in groups[:max_listed]]}
    dup = {i for g in groups for i in g[1:]}
    reps = [i for i in range(len(examples)) if i not in dup][:near_max_rows]
    clusters, compared = ac.near_duplicate_clusters([near_fields[i] for i in reps], th.near_dup)
    clusters = [[reps[i] for i in c] for c in clusters]
    near = {"clusters": len(clusters), "extra_rows": sum(len(c) - 1 for c in clusters), "comparisons": compared,
            "scanned": len(reps), "examples": [[examples[i].row for i in c] for c in clusters[:max_listed]]}
    if len(reps) < len(examples) - len(dup):
        near["note"] = f"scanned the first {len(reps)} distinct rows only (--near-dup-max-rows)"
    return {"exact": exact, "near": near}


def _contradictions(keys_fwd, keys_rev, examples, max_listed) -> dict:
    """keys_fwd[i]: example i's (prompt, A, B) meaning A > B; keys_rev[i]: the opposite claim."""
    fwd = {}
    for i, k in enumerate(keys_fwd):
        fwd.setdefault(k, []).append(i)
    found, involved = [], set()
    for k, idx in fwd.items():
        other = fwd.get(keys_rev[idx[0]])
        if other and k < keys_rev[idx[0]]:  # count each unordered pair once
            found.append(sorted(examples[i].row for i in idx + other))
            involved.update(idx + other)
    return {"pairs": len(found), "rows_involved": len(involved), "examples": found[:max_listed]}


def _truncation(examples, tokenizer, max_length, max_prompt_length, max_listed):
    from prefalign.data.tokenize import TokenizedPair, tokenize_examples

    with tempfile.TemporaryDirectory() as tmp:
        rejects = os.path.join(tmp, "rejects.jsonl")
        result = tokenize_examples(examples, tokenizer, max_length=max_length,
                                   max_prompt_length=max_prompt_length or max_length // 2,
                                   on_bad_row="skip", rejects_path=rejects)
        listed, _, _ = _read_rejects(rejects, max_listed)
    items = result.items
    out = {"max_length": max_length, "max_prompt_length": max_prompt_length or max_length // 2,
           "truncated": result.stats["truncated"], "dropped": result.stats["skipped"],
           "truncated_rows": [it.row for it in items if it.truncated][:max_listed], "dropped_rows": listed}
    if items and isinstance(items[0], TokenizedPair):
        same = [it.row for it in items if it.chosen_ids == it.rejected_ids]
        out.update(identical_after_truncation=len(same), identical_after_truncation_rows=same[:max_listed])
    return out, items


def _reference(model, tokenizer, items, th: Thresholds, batch_size: int, max_listed: int) -> dict:
    import torch

    from prefalign.objective import pair_logps

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums, means = [], []
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(items), batch_size):
            out = pair_logps(model, items[s:s + batch_size], pad_id=pad_id, packing=False, token_budget=0,
                             chunk_size=0)
            sums += (out.chosen - out.rejected).tolist()
            means += (out.chosen / out.chosen_count - out.rejected / out.rejected_count).tolist()
    stats = ac.margin_stats(sums, th.easy_k)
    easy = stats.pop("easy", [])
    return {"pairs": len(sums), **stats, "share_correct_mean": float(sum(m > 0 for m in means) / len(means)) if means else None,
            "too_easy": len(easy), "too_easy_rows": [items[i].row for i in easy][:max_listed],
            "margins": [{"row": it.row, "sum": s, "mean": m} for it, s, m in zip(items, sums, means)][:max_listed]}


def run_audit(data: str, *, kind: str = "auto", split: str = "train", tokenizer=None, model=None,
              max_length: int = 1024, max_prompt_length: int = 0, batch_size: int = 8,
              thresholds: Thresholds | None = None, max_listed: int = 1000,
              near_dup_max_rows: int = 200_000) -> dict:
    """The audit report as a JSON-ready dict: counts, checks, notes and warnings (docs/audit.md)."""
    th = thresholds or Thresholds()
    examples, found, counts = _load(data, kind, split, max_listed)
    report = {"data": str(data), "kind": found, "style": None, "counts": counts, "checks": {}, "notes": [],
              "thresholds": asdict(th), "warnings": []}
    checks, notes = report["checks"], report["notes"]
    n = len(examples)
    if examples:
        report["style"] = "chat" if isinstance(examples[0].prompt, list) else "text"
    paired = found == "paired"
    if paired:
        c_txt = [ac.text_of(e.chosen) for e in examples]
        r_txt = [ac.text_of(e.rejected) for e in examples]
        checks["length_bias"] = ac.paired_length_stats([len(t) for t in c_txt], [len(t) for t in r_txt])
        exact_keys = ["\x1e".join(ac.key_of(f) for f in (e.prompt, e.chosen, e.rejected)) for e in examples]
        norm = [(ac.normalize(e.prompt), ac.normalize(e.chosen), ac.normalize(e.rejected)) for e in examples]
        checks["duplicates"] = _duplicates(examples, exact_keys, norm, th, max_listed, near_dup_max_rows)
        same = [i for i, (_, c, r) in enumerate(norm) if c == r]
        checks["identical"] = {"exact": counts["skipped_identical"], "normalized": len(same),
                               "normalized_rows": _rows(examples, same, max_listed)}
        checks["contradictions"] = _contradictions(norm, [(p, r, c) for p, c, r in norm], examples, max_listed)
        checks["style_markers"] = ac.style_stats(c_txt, r_txt, paired=True)
    elif found == "unpaired":
        texts = [ac.text_of(e.completion) for e in examples]
        labels = [e.label for e in examples]
        checks["length_bias"] = ac.unpaired_length_stats([len(t) for t in texts], labels)
        exact_keys = ["\x1e".join((ac.key_of(e.prompt), ac.key_of(e.completion), str(e.label))) for e in examples]
        norm = [(ac.normalize(e.prompt), ac.normalize(e.completion)) for e in examples]
        checks["duplicates"] = _duplicates(examples, exact_keys, norm, th, max_listed, near_dup_max_rows)
        checks["contradictions"] = _contradictions([k + (lab,) for k, lab in zip(norm, labels)],
                                                   [k + (not lab,) for k, lab in zip(norm, labels)],
                                                   examples, max_listed)
        checks["style_markers"] = ac.style_stats([t for t, y in zip(texts, labels) if y],
                                                 [t for t, y in zip(texts, labels) if not y], paired=False)
    elif found == "prompt":
        keys = [ac.key_of(e.prompt) for e in examples]
        checks["duplicates"] = _duplicates(examples, keys, [(ac.normalize(e.prompt),) for e in examples], th,
                                           max_listed, near_dup_max_rows)
        notes.append("prompt-only data: length bias, contradictions, style and reference checks need responses")
    items = []
    if not examples:
        notes.append("no row passed validation: only the field problems are reported")
    elif tokenizer is None:
        notes.append("truncation: skipped (no tokenizer; pass --tokenizer or --model)")
    else:
        checks["truncation"], items = _truncation(examples, tokenizer, max_length, max_prompt_length, max_listed)
    if model is not None and paired and items:
        checks["reference"] = _reference(model, tokenizer, items, th, batch_size, max_listed)
    elif model is not None:
        notes.append("reference margins: skipped (they need paired rows that tokenize)")
    else:
        notes.append("reference margins: skipped (no --model)")
    report["warnings"] = _warnings(report, th, n)
    return report


def _share(k, n):
    return k / n if n else 0.0


def _warnings(report: dict, th: Thresholds, n: int) -> list[dict]:
    w = []

    def warn(check, message):
        w.append({"check": check, "message": message})

    counts, checks = report["counts"], report["checks"]
    if _share(counts["skipped"], counts["rows"]) > th.max_skipped:
        top = ", ".join(f"{f}: {k}" for f, k in Counter(counts["skipped_by_field"]).most_common(3))
        warn("fields", f"{counts['skipped']} of {counts['rows']} rows failed validation and were skipped ({top})")
    lb = checks.get("length_bias", {})
    if report["kind"] == "paired" and lb.get("share_chosen_longer") is not None:
        s, decided = lb["share_chosen_longer"], lb["chosen_longer"] + lb["rejected_longer"]
        if decided >= th.min_pairs and lb["sign_test_p"] < th.alpha and max(s, 1 - s) >= th.length_share:
            who = "chosen" if s >= 0.5 else "rejected"
            warn("length_bias", f"{who} is longer in {max(s, 1 - s):.0%} of {decided} pairs (sign test p="
                                f"{lb['sign_test_p']:.2g}); median length ratio chosen/rejected "
                                f"{lb['ratio_quantiles']['p50']:.2f}")
    elif report["kind"] == "unpaired" and lb.get("point_biserial") is not None and n >= th.min_pairs:
        if abs(lb["point_biserial"]) >= th.length_corr:
            warn("length_bias", f"length correlates with the label: point-biserial r = {lb['point_biserial']:.2f}")
    dups = checks.get("duplicates", {})
    for name in ("exact", "near"):
        d = dups.get(name)
        if d and _share(d["extra_rows"], n) > th.max_duplicates:
            groups = f"{d['groups']} groups" if name == "exact" else f"{d['clusters']} clusters"
            warn(f"duplicates/{name}", f"{d['extra_rows']} rows are {name} duplicates of others ({groups})")
    ident = checks.get("identical")
    if ident and _share(ident["exact"] + ident["normalized"], counts["rows"]) > th.max_identical:
        warn("identical", f"{ident['exact']} pairs have chosen == rejected exactly (skipped by validation) and "
                          f"{ident['normalized']} more differ only in case or whitespace")
    con = checks.get("contradictions")
    if con and _share(con["rows_involved"], n) > th.max_contradictions:
        warn("contradictions", f"{con['pairs']} contradictions (the same comparison labelled both ways), "
                               f"{con['rows_involved']} rows involved")
    tr = checks.get("truncation")
    if tr and _share(tr["truncated"] + tr["dropped"], n) > th.max_truncated:
        warn("truncation", f"{tr['truncated']} rows truncated and {tr['dropped']} dropped at "
                           f"max_length={tr['max_length']}" + (f"; {tr['identical_after_truncation']} become "
                                                               "identical pairs" if tr.get(
                                                                   "identical_after_truncation") else ""))
    paired = report["kind"] == "paired"
    for marker, s in checks.get("style_markers", {}).items():
        differ = s["pairs_only_chosen"] + s["pairs_only_rejected"] if paired else s["count_chosen"] + s["count_rejected"]
        ratio = s["ratio"]
        skewed = s["only_in_chosen"] or (ratio is not None and (ratio >= th.style_ratio or
                                                                  ratio <= 1 / th.style_ratio))
        if skewed and differ >= th.style_min_count and n >= th.min_pairs:
            r = ("only in chosen" if s["only_in_chosen"] else "only in rejected" if s["only_in_rejected"]
                 else f"ratio {ratio:.2f}")
            warn(f"style/{marker}", f"{marker} in {s['rate_chosen']:.0%} of chosen vs {s['rate_rejected']:.0%} "
                                    f"of rejected ({r})")
    ref = checks.get("reference")
    if ref:
        if _share(ref["too_easy"], ref["pairs"]) > th.max_easy_share:
            warn("reference/too_easy", f"{ref['too_easy']} pairs have a reference margin above {ref['threshold']:.3g}"
                                       f" (median {ref['median']:.3g} + {th.easy_k} x 1.4826 x MAD)")
        if ref["share_correct"] > th.max_ref_correct:
            warn("reference/already_correct", f"the reference already prefers chosen in {ref['share_correct']:.0%}"
                                              " of pairs (summed log-probs)")
    return w


# ----------------------------------------------------------------------------- output


def print_summary(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    c = report["counts"]
    con.print(f"[bold]prefalign audit[/bold] {report['data']}: {report['kind'] or 'no valid'} "
              f"{report['style'] or ''} data, {c['rows']} rows ({c['loaded']} valid, {c['skipped']} skipped)")
    t = Table(title="checks", show_lines=False)
    t.add_column("check")
    t.add_column("result")
    ch = report["checks"]
    lb = ch.get("length_bias", {})
    if "share_chosen_longer" in lb and lb["share_chosen_longer"] is not None:
        q = lb["ratio_quantiles"]
        t.add_row("length bias", f"chosen longer {lb['chosen_longer']}, rejected longer {lb['rejected_longer']}, "
                                 f"ties {lb['ties']} (share {lb['share_chosen_longer']:.2f}, sign p "
                                 f"{lb['sign_test_p']:.2g}, r_pb {lb['point_biserial'] or 0:.2f}); ratio p5/p50/p95 "
                                 f"{q['p5']:.2f}/{q['p50']:.2f}/{q['p95']:.2f}")
    elif "mean_chars_desirable" in lb:  # unpaired (paired stats with all lengths tied have r_pb too)
        t.add_row("length bias", f"mean chars desirable {lb['mean_chars_desirable']}, undesirable "
                                 f"{lb['mean_chars_undesirable']}, r_pb {lb['point_biserial']}")
    if "duplicates" in ch:
        d = ch["duplicates"]
        t.add_row("duplicates", f"exact: {d['exact']['extra_rows']} extra rows in {d['exact']['groups']} groups; "
                                f"near: {d['near']['extra_rows']} extra rows in {d['near']['clusters']} clusters")
    if "identical" in ch:
        t.add_row("identical", f"exact {ch['identical']['exact']}, normalized {ch['identical']['normalized']}")
    if "contradictions" in ch:
        t.add_row("contradictions", f"{ch['contradictions']['pairs']} ({ch['contradictions']['rows_involved']} rows)")
    if "truncation" in ch:
        tr = ch["truncation"]
        t.add_row("truncation", f"{tr['truncated']} truncated, {tr['dropped']} dropped at {tr['max_length']}")
    if "reference" in ch:
        r = ch["reference"]
        t.add_row("reference", f"correct {r['share_correct']:.0%} (summed), {r['share_correct_mean']:.0%} (mean); "
                               f"median margin {r['median']:.3g}, too easy (> {r['threshold']:.3g}) {r['too_easy']}")
    con.print(t)
    if ch.get("style_markers"):
        s = Table(title="style markers (share of responses)")
        for col in ("marker", "chosen", "rejected", "ratio"):
            s.add_column(col)
        for m, e in ch["style_markers"].items():
            ratio = ("only chosen" if e["only_in_chosen"] else "only rejected" if e["only_in_rejected"]
                     else "-" if e["ratio"] is None else f"{e['ratio']:.2f}")
            s.add_row(m, f"{e['rate_chosen']:.2f}", f"{e['rate_rejected']:.2f}", ratio)
        con.print(s)
    for note in report["notes"]:
        con.print(f"note: {note}", highlight=False, soft_wrap=True)
    if report["warnings"]:
        con.print(f"[bold yellow]{len(report['warnings'])} warnings[/bold yellow]")
        for w in report["warnings"]:
            con.print(f"  ! {w['check']}: {w['message']}", highlight=False, markup=False, soft_wrap=True)
    else:
        con.print("no warnings")


def cmd_audit(args) -> None:
    from prefalign.models import load_model, load_tokenizer

    check_output_file(args.json, "--json")
    th = Thresholds(**{f.name: getattr(args, f.name) for f in fields(Thresholds)})
    tok_path = args.tokenizer or args.model
    tokenizer = load_tokenizer(tok_path) if tok_path else None
    model = load_model(args.model) if args.model else None
    report = run_audit(args.data, kind=args.kind, split=args.split, tokenizer=tokenizer, model=model,
                       max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                       batch_size=args.batch_size, thresholds=th, max_listed=args.max_listed,
                       near_dup_max_rows=args.near_dup_max_rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
    print_summary(report)


def register(sub) -> None:
    p = sub.add_parser("audit", help="audit preference data: field problems, length bias, duplicates, "
                                     "contradictions, truncation, style, reference margins",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("data", type=path_arg, help="a data file, saved dataset directory or hub name")
    p.add_argument("--model", type=path_arg, default="", help="reference model: margins, too-easy pairs (also its tokenizer) (default: none)")
    p.add_argument("--tokenizer", type=path_arg, default="", help="tokenizer for the truncation check (default: empty: --model's)")
    add_ranged(p, "--max-length", int, ">= 1", "max tokens of prompt + completion", default=1024)
    add_ranged(p, "--max-prompt-length", int, ">= 0", "max prompt tokens (0 = half of max-length)", default=0)
    p.add_argument("--kind", default="auto", choices=("auto", "paired", "unpaired", "prompt"),
                   help="the data's kind; auto: told from its columns (default: 'auto')")
    p.add_argument("--split", default="train", help="split of a datasets dir or hub name (default: 'train')")
    p.add_argument("--json", type=path_arg, default="", help="also write the full report to this JSON file (default: none)")
    add_ranged(p, "--batch-size", int, ">= 1", "pairs per forward pass with --model", default=8)
    add_ranged(p, "--max-listed", int, ">= 0", "rows listed per finding in the JSON", default=1000)
    add_ranged(p, "--near-dup-max-rows", int, ">= 0", "rows scanned for near duplicates", default=200_000)
    for f in fields(Thresholds):
        add_ranged(p, "--" + f.name.replace("_", "-"), type(f.default), THRESHOLD_RANGES[f.name],
                   "warning threshold (see docs/audit.md)", default=f.default)
    p.set_defaults(func=cmd_audit)
