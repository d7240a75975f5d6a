"""Where does the CUDA build of a model first differ from onnxruntime? Tensor by tensor.

Every float32 intermediate tensor of the model is made a graph output; the model is
compiled dense-only by the CUDA path (`relax_build.build_module`, dlight schedules) and
run on the GPU, and each tensor is compared with onnxruntime (CPU) on the same inputs, in
graph order. The first tensor
whose error relative to its max |value| exceeds `TOL` names the op that computes wrong.
`--target llvm` runs the same check through the CPU path (the control).

    python benchmarks/gpu_numerics.py [model.onnx] [--target cuda|llvm]

Writes benchmarks/results/gpu_numerics.{md,json} (or into $OUT when that is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-3
SHAPES = {"tokens": [2, 8]}


def with_intermediates(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every float32 node output (dtype from shape inference) also a graph output."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(proto))
    names = {t.name for t in graph.outputs}
    for node in graph.nodes:
        for t in node.outputs:
            if isinstance(t, gs.Variable) and t.dtype == np.float32 and t.name not in names:
                graph.outputs.append(t)
                names.add(t.name)
    return gs.export_onnx(graph)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(ROOT / "examples/stories260K/stories260K.onnx"))
    ap.add_argument("--target", default="cuda")
    args = ap.parse_args()

    import onnxruntime as ort
    import tvm
    from tvm import relax

    from sparsegraph.codegen.relax_build import build_module
    from sparsegraph.compile import resolve_target

    target = resolve_target(args.target)
    proto = with_intermediates(onnx.load(args.model))
    out_names = [o.name for o in proto.graph.output]
    tag = "b" + "_".join(str(d) for d in next(iter(SHAPES.values())))
    ex, _, params, names = build_module(proto, {tag: SHAPES}, lambda *a: None, set(), target)
    dev = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu()
    feeds = {"tokens": np.random.default_rng(0).integers(0, 512, SHAPES["tokens"]).astype(np.int64)}
    vm_args = [tvm.runtime.tensor(v, dev) for v in feeds.values()]
    vm_args += [tvm.runtime.tensor(params[n], dev) for n in names[f"main_{tag}"]]
    got = relax.VirtualMachine(ex, dev)[f"main_{tag}"](*vm_args)
    got = [got] if hasattr(got, "numpy") else list(got)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(out_names, feeds)
    node_of = {o: (n.op_type, n.name) for n in proto.graph.node for o in n.output}
    rows = []
    for name, g, r in zip(out_names, got, ref, strict=True):
        g = g.numpy()
        with np.errstate(invalid="ignore"):  # equal infinities (masks) agree
            diff = np.where(g == r, 0.0, np.abs(g.astype(np.float64) - r))
        scale = float(np.abs(r[np.isfinite(r)]).max(initial=0.0))
        err = float(np.nan_to_num(diff.max(), nan=np.inf) / max(scale, 1e-6))
        op_type, node = node_of.get(name, ("", ""))
        rows.append(
            {"tensor": name, "op_type": op_type, "node": node, "shape": list(r.shape), "rel_err": err}
        )
    order = {name: i for i, name in enumerate(o for n in proto.graph.node for o in n.output)}
    rows.sort(key=lambda row: order.get(row["tensor"], -1))
    bad = [row for row in rows if row["rel_err"] > TOL]
    first = bad[0] if bad else None
    print(f"{len(rows)} tensors compared on {args.target}; {len(bad)} above {TOL}")
    for row in bad[:15]:
        print(f"  {row['op_type']:<12} {row['node']:<40} {row['tensor']:<40} {row['rel_err']:.3g}")
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "target": str(target), "tol": TOL, "first_bad": first, "rows": rows}
    (out / "gpu_numerics.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# {Path(args.model).name} on {args.target}: intermediate tensors vs onnxruntime",
        "",
        f"First tensor above {TOL}: "
        + (f"`{first['tensor']}` ({first['op_type']} `{first['node']}`)" if first else "none"),
        "",
        "| op | node | tensor | shape | rel err |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['op_type']} | {r['node']} | {r['tensor']} | {r['shape']} | {r['rel_err']:.3g} |" for r in rows
    ]
    (out / "gpu_numerics.md").write_text("\n".join(lines) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
