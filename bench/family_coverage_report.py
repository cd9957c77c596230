"""The family coverage sweep's report (bench/family_coverage.py): the verdict and failure category of each
family's attempts, the markdown table in bench/measured/family_coverage.md and the README table between the
`<!-- family-coverage:start/end -->` markers."""
from __future__ import annotations

import re
from pathlib import Path

EXACT_TOL = 1e-5  # fp32 max relative logit error for "exact" (README: tested per family)
MODES = ("exact", "foe")
ROOT = Path(__file__).resolve().parent.parent
README_START, README_END = "<!-- family-coverage:start -->", "<!-- family-coverage:end -->"


def verdict(rec: dict) -> str:
    if not rec.get("build", {}).get("ok"):
        return "build failed"
    if not rec.get("source", {}).get("ok"):
        return "source forward failed"
    att = rec["attempts"].get("exact") or {}
    if att.get("status") != "ok":
        return f"exact: {att.get('status', 'not run')} at {att.get('stage', '?')}"
    if att["max_error"] <= EXACT_TOL:
        return "exact"
    return "WRONG RESULT (report claims exact)" if claims_exact(att) else "not exact (report agrees)"


def claims_exact(att: dict) -> bool:
    """The report says exact: measured so, or exact by construction with nothing measured."""
    return bool(att.get("report_exact")) or (bool(att.get("report_structurally_exact"))
                                             and att.get("report_validation_error") is None)


def report_label(att: dict) -> str:
    if att.get("report_exact"):
        return "exact"
    if att.get("report_structurally_exact") and att.get("report_validation_error") is None:
        return "exact structure, unverified"
    if att.get("report_validation_error") is not None:
        return f"not exact (validated {att['report_validation_error']:.1e})"
    return "not exact"


# (pattern on the error text, category): first match wins, so what blocks a rewrite comes before
# what is only noted (a router left as written no longer stops the experts from being lowered).
# The pattern's first group, when it has one, is the per-family detail shown after its name.
CATEGORIES = [
    (r"Detected mismatch between the structure of `inputs` and `dynamic_shapes`",
     "capture: example inputs vs forward signature"),
    (r"GuardOnDataDependent|Could not guard on data-dependent|Could not extract specialized integer",
     "capture (torch.export): data-dependent guard in the model code"),
    (r"(Argument '\w+' of Node '\w+') was used before it has been defined",
     "pass bug: graph left out of topological order (fused op reads a later node)"),
    (r"int\(\) argument must be .* not 'Node'", "pass bug: int() on a graph Node (a symbolic size)"),
    (r"no MoE block found|no router \(linear -> top-k\) found",
     "matcher: no MoE block found (no linear -> top-k router)"),
    (r"expert unit computes (\S+)", "expert unit: none of foe::experts_swiglu's units"),
    (r"successive argmax", "router matcher: successive argmax picks (routing stays in the graph)"),
    (r"called with tensor keyword arguments", "module level: the block is called with tensor keyword arguments"),
    (r"routing weights are changed after the router",
     "router matcher: weights changed after the router (e.g. an eps in the renormalisation)"),
    (r"depends on tensor values|computed from tensor values",
     "capture (torch.export): data-dependent control flow in the model code"),
    (r"is inside the attention module",
     "expert matcher: a top-k inside attention (attention-head experts or a sparse-attention selection)"),
    (r"matches none of the supported forms", "expert matcher: unsupported expert computation"),
    (r"scaled by something other than the routing weights",
     "expert matcher: expert outputs scaled beyond the routing weights (routed scaling factor)"),
    (r"scoring each group by its maximum",
     "router matcher: group-limited top-k scored by the group maximum (DeepSeek-V2's group_limited_greedy)"),
    (r"not DeepSeek-V3's group limit", "router matcher: a masked selection that is not DeepSeek-V3's group limit"),
    (r"router scores come from (masked_fill|sum\.dim_IntList)",
     "router matcher: group-limited top-k (DeepSeek-V3 style group sums + masked_fill, also at n_group = 1)"),
    (r"router scores come from add\.Tensor", "router matcher: top-k on bias-corrected scores (score + bias)"),
    (r"router scores come from (\S+)", "router matcher: scoring other than softmax"),
    (r"router \S+ has a bias", "router matcher: router linear with a bias"),
    (r"top-k on logits without a softmax", "router matcher: top-k on raw logits, no softmax or sigmoid of the picks"),
    (r"picked logits scattered into", "router matcher: top-k on logits scattered into a [T, E] matrix and scored there "
     "(Llama 4; routing stays in the graph)"),
    (r"does not read RMSNorm\(residual \+ attention output\)",
     "FoE form: router input is not RMSNorm(residual + attention output)"),
    (r"needs an attention between consecutive MoE/MLP blocks",
     "FoE form: MoE blocks not separated by a recognised attention"),
    (r"no attention the passes recognise", "FoE form: no recognised attention (H undefined)"),
    (r"Unsupported|torch\._dynamo|UserError|torch\.export", "capture (torch.export): other"),
]


def _match(att: dict):
    text = f"{att.get('error_type', '')} {att.get('error_detail') or att.get('error', '')}"
    for pattern, name in CATEGORIES:
        found = re.search(pattern, text)
        if found:
            return name, (found.group(1) if found.groups() else None)
    return None, None


def category(att: dict) -> str:
    if att.get("status") == "ok":
        return "ok"
    if att.get("status") in ("timeout", "crash"):
        return f"{att['status']}"
    stage = att.get("stage", "?")
    stage = "run" if stage.startswith("run") else stage
    name, _ = _match(att)
    if name is None and att.get("where_foe"):  # an internal error, not a refusal
        name = f"internal error: {att.get('error_type')} at {att['where_foe']}"
    return f"{stage}: {name or att.get('error_type', '?')}"


def fmt_err(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def _cell(att: dict | None) -> str:
    """One table cell: measured errors and what the report says, or the failure's category."""
    if not att:
        return "-"
    if att.get("status") != "ok":
        return f"✘ {att.get('category') or category(att)}"
    e, good = att["errors"], att["max_error"] <= EXACT_TOL
    text = (f"{'✔' if good else '≈'} {att['path']}, {fmt_err(e['2x7'])} / {fmt_err(e['1x5'])}; "
            f"report: {report_label(att)}")
    if att["path"] in ("fx", "blocks"):
        ops = att.get("foe_ops") or {}
        text += f"; fused route {ops.get('sum_route_dispatch', 0)}, experts {ops.get('experts_swiglu', 0)}"
        listed = (att.get("report_moe_layers") or 0) + (att.get("report_untouched_blocks") or 0)
        if ops.get("experts_swiglu", 0) > listed:
            text += f" (report lists {att.get('report_moe_layers')} MoE layers)"
    if att.get("report_untouched_blocks"):
        text += f"; {att['report_untouched_blocks']} MoE block(s) left as written"
    if claims_exact(att) and not good:
        text += " **WRONG: report claims exact**"
    return text


def _failures(rows: list[dict], mode: str) -> dict[str, list[dict]]:
    """category -> rows, for every family that did not produce an exact (or, for FoE, any) model."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if not r.get("source", {}).get("ok"):
            stage = "build" if not r.get("build", {}).get("ok") else "source forward"
            groups.setdefault(f"{stage} failed (transformers; before convert)", []).append(r)
            continue
        att = r["attempts"].get(mode, {})
        cat = att.get("category") or category(att)
        if cat == "ok" and mode == "exact" and att["max_error"] > EXACT_TOL:
            cat = "WRONG RESULT (report claims exact)" if claims_exact(att) else "converted, not exact (report agrees)"
        if cat != "ok":
            groups.setdefault(cat, []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def _with_detail(r: dict, mode: str) -> str:
    att = r.get("attempts", {}).get(mode) or {}
    detail = _match(att)[1] if att.get("status") not in (None, "ok") else None
    return f"{r['model_type']} ({detail})" if detail else r["model_type"]


def _sample(r: dict, mode: str) -> str:
    info = r["attempts"].get(mode) if r.get("source", {}).get("ok") else (r.get("source") or r.get("build") or {})
    info = info or {}
    where = "; ".join(x for x in (info.get("where_foe") and f"raised at {info['where_foe']}",
                                  info.get("cause") and f"model code: {info['cause']}") if x)
    message = info.get("error") or ""
    detail, name = info.get("error_detail") or "", _match(info)[0] if info is not r.get("source") else None
    pattern = next((p for p, n in CATEGORIES if n == name), None)
    found = re.search(pattern, detail) if pattern else None
    if found and found.start() > 150:  # the blocking reason is past the first line's start: quote it
        message = f"{message[:80]} ... {detail[max(0, found.start() - 40):found.start() + 160]}"
    message = message.replace("|", "\\|").replace("\n", " ")
    return f"`{info.get('error_type', '?')}: {message}`" + (f" ({where})" if where else "")


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# MoE family coverage of foe_compile.convert()",
        "",
        f"transformers {meta['transformers']}, torch {meta['torch']}, foe_compile at {meta['commit']}; "
        f"{meta['families']} families; sweep {meta['sweep_seconds']:.0f} s with {meta['jobs']} workers "
        f"on {meta['machine']}.",
        f"Produced by `{meta['command']}`.",
        "",
        "Tiny random-weight models from `foe_compile.hf_zoo` (fp32, CPU; zero-initialised biases, "
        "correction biases, sinks and norm offsets randomised so they matter). Errors: max |logits - "
        "source| / max |source| at [2, 7] / [1, 5] token ids, source logits taken before converting a "
        f"deep copy. A family is exact when convert(mode='exact') succeeded and both errors are <= {EXACT_TOL:g}. "
        "Attention and router kinds come from the config (router scoring: the router's source when "
        "the config does not say). ✔ within tolerance, ≈ converted but not exact, ✘ failed (category "
        "below).",
        "",
        f"**Exact: {meta['exact_count']} / {meta['families']} families.** " + (
            f"**SILENT WRONG RESULTS (report claims exact, measured > {EXACT_TOL:g}): "
            f"{', '.join(meta['silent_wrong'])}**" if meta["silent_wrong"] else
            "No silent wrong results (no report claims exact with a larger measured error)."),
        "",
        "| family | attention | router | experts act | mode='exact' | mode='foe' |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r.get("attempts", {})
        if not r.get("source", {}).get("ok"):
            stage = "build" if not r.get("build", {}).get("ok") else "source forward"
            exact_cell, foe_cell = f"✘ {stage} failed (before convert)", "-"
        else:
            exact_cell, foe_cell = _cell(a.get("exact")), _cell(a.get("foe"))
        lines.append(f"| {r['model_type']} | {r.get('attention', '?')} | {r.get('router', '?')} | "
                     f"{r.get('experts_act', '?')} | {exact_cell} | {foe_cell} |")
    lines += ["", "## Failures by category", "",
              "Per category: the families, then one message (first line, 200 chars) with where it was raised."]
    for mode in MODES:
        lines += ["", f"### mode='{mode}'", ""]
        for cat, group in _failures(rows, mode).items():
            lines.append(f"- **{cat}** ({len(group)}): {', '.join(_with_detail(r, mode) for r in group)}")
            lines.append(f"  - e.g. {group[0]['model_type']}: {_sample(group[0], mode)}")
    lines += ["", "## Consistency checks", ""]
    checks = [
        (f"{r['model_type']} ({mode}): {a['foe_ops'].get('experts_swiglu')} expert blocks lowered, but the report "
         f"lists {a['report_moe_layers']} MoE layer(s) (+{a['report_untouched_blocks']} left as written)")
        for r in rows for mode, a in r.get("attempts", {}).items()
        if a.get("status") == "ok" and a.get("path") in ("fx", "blocks")
        and (a.get("foe_ops") or {}).get("experts_swiglu", 0) > a["report_moe_layers"] + a["report_untouched_blocks"]
    ] + [f"{r['model_type']}: the source model changed while its copies were converted"
         for r in rows if r.get("source_unchanged") is False]
    lines += [f"- {c}" for c in checks] or ["- none failed"]
    lines += ["", "Checked: report claims exact but measured error larger (silent wrong result; listed at the top); "
              "report's MoE layer count vs expert blocks lowered in the graph; source model unchanged by convert() "
              "of its deep copy."]
    if meta.get("composite"):
        lines += ["", "Multimodal wrappers are measured through their text decoder: "
                  + ", ".join(f"{k} -> {v}" for k, v in meta["composite"].items()) + "."]
    return "\n".join(lines) + "\n"


def readme_table(meta: dict, rows: list[dict]) -> str:
    """The README's compact coverage table (family · attention · router · experts · exact · FoE)."""
    def short(att: dict | None) -> str:
        if not att:
            return "-"
        if att.get("status") == "ok":
            mark = "✔" if att["max_error"] <= EXACT_TOL else "≈"
            return f"{mark} {att.get('path', '')} {fmt_err(att.get('max_error'))}"
        return "✘ " + category(att).removeprefix("convert: ")

    lines = [f"{meta['exact_count']} / {meta['families']} families exact (transformers {meta['transformers']}, "
             f"measured by `{meta['command']}` at {meta['commit']}; ✔ within {EXACT_TOL:g}, ≈ approximate, "
             "✘ refused, with the category):", "",
             "| family | attention | router | experts | exact | FoE |", "|---|---|---|---|---|---|"]
    for r in rows:
        a = r.get("attempts", {})
        ran = r.get("source", {}).get("ok")
        lines.append(f"| {r['model_type']} | {r.get('attention', '?')} | {r.get('router', '?')} | "
                     f"{r.get('experts_act', '?')} | {short(a.get('exact')) if ran else '✘ source model fails'} | "
                     f"{short(a.get('foe')) if ran else '-'} |")
    return "\n".join(lines)


def write_readme(meta: dict, rows: list[dict]) -> None:
    """Replace the table between the README's family-coverage markers (if the README has them)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        readme.write_text(f"{head}{README_START}\n{readme_table(meta, rows)}\n{README_END}{tail}")
        print(f"updated the coverage table in {readme}")
