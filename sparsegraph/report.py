"""Compile reports: one JSON for machines and one Markdown page for people.

The per-op table joins what the analyses saw before and after the recipe: role, layer,
shape, sparsity and nonzeros, dense bytes and the bytes of the smallest sparse format
(the `cost_model`), and the rewrites applied. Totals, the numeric diff of every model
output against the original, warnings and pass timings follow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import report_sections
from .pass_manager import PassContext
from .validate import OutputDiff


def op_rows(before: dict[str, Any], after: dict[str, Any], ctx: PassContext) -> list[dict[str, Any]]:
    """Rows per original weighted op. `before`/`after` map op name -> dict with keys
    role, layer, op_type, shape, params, nonzeros, bytes_dense, bytes_best, best_format."""
    applied: dict[str, list[dict]] = {}
    for pass_name, result, _ in ctx.history:
        for change in result.changes:
            applied.setdefault(change.op, []).append(
                {"pass": pass_name, "action": change.action, **change.detail}
            )
    rows = []
    for name, b in before.items():
        a = after.get(name)
        changes = applied.get(name, [])
        factored = next((c for c in changes if c["action"] == "lowrank"), None)
        if a is None and factored:
            itemsize = b["bytes_dense"] // max(b["params"], 1)
            a = {
                "nonzeros": factored["params_after"],
                "params": factored["params_after"],
                "bytes_dense": factored["params_after"] * itemsize,
                "best_format": "lowrank",
            }
            a["bytes_best"] = a["bytes_dense"]
        if a is None:  # removed by a rewrite we have no record for
            a = {"nonzeros": 0, "params": 0, "bytes_dense": 0, "bytes_best": 0, "best_format": "removed"}
        rows.append(
            {
                "op": name,
                "op_type": b["op_type"],
                "role": b["role"],
                "layer": b["layer"],
                "shape": b["shape"],
                "params": b["params"],
                "params_after": a["params"],
                "shape_after": a.get("shape", b["shape"]),
                "nonzeros_before": b["nonzeros"],
                "nonzeros_after": a["nonzeros"],
                "sparsity_before": 1 - b["nonzeros"] / max(b["params"], 1),
                "sparsity_after": 1 - a["nonzeros"] / max(b["params"], 1),
                "bytes_dense_before": b["bytes_dense"],
                "bytes_dense_after": a["bytes_dense"],
                "bytes_best_after": a["bytes_best"],
                "format_after": a["best_format"],
                "applied": [c["action"] for c in changes if c["action"] != "skipped"],
            }
        )
    return rows


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    t = {
        k: sum(r[k] for r in rows)
        for k in (
            "params",
            "params_after",
            "nonzeros_before",
            "nonzeros_after",
            "bytes_dense_before",
            "bytes_dense_after",
            "bytes_best_after",
        )
    }
    t["sparsity_after"] = 1 - t["nonzeros_after"] / max(t["params"], 1)
    t["compression"] = t["bytes_dense_before"] / max(t["bytes_best_after"], 1)
    return t


def build(
    *,
    model: str,
    recipe: dict,
    seed: int,
    rows: list[dict],
    ctx: PassContext,
    diffs: list[OutputDiff] | None,
    files: dict[str, int],
    feeds: str,
    extra: dict | None = None,
) -> dict[str, Any]:
    report = {
        "model": model,
        "recipe": recipe,
        "seed": seed,
        "totals": totals(rows),
        "ops": rows,
        "validation": {
            "feeds": feeds,
            "outputs": [d.to_dict() for d in diffs] if diffs is not None else None,
        },
        "passes": [
            {
                "pass": name,
                "modified": res.modified,
                "changes": len(res.changes),
                "seconds": round(sec, 4),
                "warnings": res.warnings,
                "skipped": [
                    {"op": c.op, "reason": str(c.detail.get("reason", ""))}
                    for c in res.changes
                    if c.action == "skipped"
                ],
            }
            for name, res, sec in ctx.history
        ],
        "files": files,
    }
    report.update(report_sections.for_report(ctx))  # sections passes added (sensitivity, owl)
    report.update(extra or {})
    return report


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=_jsonable)


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def to_markdown(report: dict[str, Any]) -> str:
    t = report["totals"]
    lines = [
        f"# sparsegraph compile report: {report['model']}",
        "",
        f"Recipe: `{json.dumps(report['recipe']['steps'])}` · seed {report['seed']}",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| weights (params; shrinks only when shapes do) | {t['params']:,} | {t['params_after']:,} |",
        f"| nonzero weights | {t['nonzeros_before']:,} | {t['nonzeros_after']:,} |",
        f"| sparsity (zero or removed, of the original weights) "
        f"| {1 - t['nonzeros_before'] / max(t['params'], 1):.1%} "
        f"| {t['sparsity_after']:.1%} |",
        f"| weight bytes, dense storage | {_mb(t['bytes_dense_before'])} | {_mb(t['bytes_dense_after'])} |",
        f"| weight bytes, best sparse format | – | {_mb(t['bytes_best_after'])} "
        f"({t['compression']:.2f}x smaller) |",
        "",
        "## Ops",
        "",
        "| op | type | role | layer | shape (N×K) | sparsity before → after | nonzeros after | format "
        "| bytes dense → best | applied |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["ops"]:
        lines.append(
            f"| `{r['op']}` | {r['op_type']} | {r['role'] or '–'} "
            f"| {'' if r['layer'] is None else r['layer']} "
            f"| {r['shape'][0]}×{r['shape'][1]} | {r['sparsity_before']:.1%} → {r['sparsity_after']:.1%} "
            f"| {r['nonzeros_after']:,} | {r['format_after']} | {_mb(r['bytes_dense_before'])} → "
            f"{_mb(r['bytes_best_after'])} | {', '.join(r['applied']) or '–'} |"
        )
    val = report["validation"]
    lines += ["", f"## Numeric diff vs the original ({val['feeds']})", ""]
    if val["outputs"] is None:
        lines.append("Validation was skipped.")
    else:
        lines += ["| output | max abs | mean abs | max rel | cosine |", "|---|---|---|---|---|"]
        for d in val["outputs"]:
            lines.append(
                f"| `{d['name']}` | {d['max_abs']:.4g} | {d['mean_abs']:.4g} | {d['max_rel']:.4g} "
                f"| {d['cosine']:.6f} |"
            )
    lines += [
        "",
        "## Passes",
        "",
        "| pass | modified | changes | seconds | warnings |",
        "|---|---|---|---|---|",
    ]
    for p in report["passes"]:
        lines.append(
            f"| {p['pass']} | {p['modified']} | {p['changes']} | {p['seconds']:.3f} "
            f"| {'; '.join(p['warnings']) or '–'} |"
        )
    skipped = [(p["pass"], s) for p in report["passes"] for s in p.get("skipped", [])]
    if skipped:  # ops a pass chose to leave alone, and why
        lines += ["", "Left unchanged:", ""]
        lines += [f"- `{s['op']}` ({name}): {s['reason'] or 'no reason given'}" for name, s in skipped]
    if "codegen" in report:
        lines += _codegen_markdown(report["codegen"])
    lines += report_sections.markdown(report)
    lines += ["", "## Files", ""] + [f"- `{name}`: {_mb(size)}" for name, size in report["files"].items()]
    return "\n".join(lines) + "\n"


def _codegen_markdown(cg: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## Compiled module ({cg['target']}; weights timed {cg['cache_regime']}-cache; "
        f"compile {cg['compile_seconds']:.1f} s)",
        "",
        "| bucket | compiled ms | dense-compiled ms | onnxruntime (original) ms | shipped |",
        "|---|---|---|---|---|",
    ]
    for tag, t in cg["timing_seconds"].items():
        dense = f"{t['dense_compiled'] * 1e3:.3f}" if "dense_compiled" in t else "(same: all dense)"
        ort = f"{t['onnxruntime'] * 1e3:.3f}" if "onnxruntime" in t else "–"
        lines.append(f"| {tag} | {t['compiled'] * 1e3:.3f} | {dense} | {ort} | {t['shipped']} |")
    lines += [
        "",
        "Dispatch decisions (µs per call of each candidate kernel, measured on this machine):",
        "",
        "| op | role | M | chosen | chosen µs | dense µs | candidates |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in cg["ops"]:
        for m, d in op["decisions"].items():
            cands = ", ".join(f"{k} {v * 1e6:.1f}" for k, v in d["timings"].items())
            lines.append(
                f"| `{op['op']}` | {op['role'] or '–'} | {m} | {d['label']} | {d['seconds'] * 1e6:.1f} "
                f"| {d['dense_seconds'] * 1e6:.1f} | {cands}{' (from tuning DB)' if d['from_db'] else ''} |"
            )
    act = [f for f in cg.get("fused", []) if f.get("technique") == "activation_sparsity"]
    if act:
        lines += [
            "",
            "Fused kernels (activation-sparse threshold + matmul; fused timed at the activation sparsity "
            "the model records for the threshold (else an assumed one) and, as a guard, at half of it; "
            "µs per call):",
            "",
            "| bucket | weight K x N | M | threshold | act. sparsity | fused µs | guard µs | dense µs "
            "| chosen |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for f in act:
            if "fused_us" not in f:  # declined before timing (a shape the kernel cannot run)
                lines.append(
                    f"| {f.get('bucket', '–')} | {f['weight_shape'][0]}x{f['weight_shape'][1]} | {f['M']} "
                    f"| {f.get('threshold', '–')} | – | – | – | – | {f['chosen']}: {f.get('reason', '')} |"
                )
                continue
            cal = f.get("calibrated_sparsity")
            assumed = f["assumed_activation_sparsity"]
            s = f"{cal:.0%} calibrated" if cal is not None else f"{assumed:.0%} assumed"
            lines.append(
                f"| {f.get('bucket', '–')} | {f['weight_shape'][0]}x{f['weight_shape'][1]} | {f['M']} "
                f"| {f['threshold']} | {s} | {f['fused_us']:.1f} | {f['fused_guard_us']:.1f} "
                f"| {f['dense_us']:.1f} ({f['dense_kernel']}) | {f['chosen']} |"
            )
    attn = [f for f in cg.get("fused", []) if f.get("technique") == "sparse_attention"]
    if attn:
        lines += [
            "",
            "Attention sites (block-sparse kernel where the mask is constant after specialisation):",
            "",
            "| function | heads (kv) | Lq x Lk | blocks kept / total | kernel µs | all blocks µs "
            "| rewritten |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in attn:
            if not f.get("rewritten"):
                lines.append(f"| {f['function']} | – | – | – | – | – | no: {f.get('reason', '')} |")
                continue
            us = f"{f['kernel_us']:.1f}" if "kernel_us" in f else "–"
            all_us = f"{f['all_blocks_us']:.1f}" if "all_blocks_us" in f else "–"
            lines.append(
                f"| {f['function']} | {f['heads']} ({f['kv_heads']}) | {f['lq']} x {f['lk']} "
                f"| {f['blocks_kept']} / {f['blocks_total']} | {us} | {all_us} | yes |"
            )
    return lines


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def write(report: dict[str, Any], folder: Path) -> None:
    report_sections.write_figures(report, folder)
    (folder / "report.json").write_text(to_json(report))
    (folder / "report.md").write_text(to_markdown(report))
