"""`Model`: an ONNX model held as an onnx-graphsurgeon graph, loaded and saved safely.

Contract:
- `Model.load(path)` accepts any well-formed ONNX file, with or without external data,
  of any size (tensors stored outside the protobuf are loaded from paths relative to
  the model's folder). Bad files raise `ModelLoadError` naming the file and the reason.
- `Model.save(path)` writes the model atomically (temporary files in the destination
  folder, then rename), keeps opset imports, IR version, producer, doc string, model
  version and metadata, and stores weights as external data (one `<name>.data` file
  beside the model, relative path) when they would not fit a 2 GB protobuf or when asked.
- Node and tensor names are never changed by loading or saving.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import ModelLoadError, UsageError

#: Protobuf cannot serialise messages of 2 GiB or more; keep a margin for the graph itself.
PROTOBUF_LIMIT = 2**31 - 64 * 2**20


@dataclass
class ModelMeta:
    """Model-level fields onnx-graphsurgeon does not carry through a graph round trip."""

    opset_imports: list[tuple[str, int]] = field(default_factory=list)
    doc_string: str = ""
    model_version: int = 0
    domain: str = ""
    metadata_props: dict[str, str] = field(default_factory=dict)


class Model:
    """An ONNX model: `graph` (onnx-graphsurgeon) plus what is needed to write it back."""

    def __init__(self, graph: gs.Graph, meta: ModelMeta | None = None, path: Path | None = None):
        self.graph = graph
        self.meta = meta or ModelMeta()
        self.path = path

    # ----------------------------------------------------------------- load / save
    @classmethod
    def load(cls, path: str | os.PathLike) -> Model:
        """Load and check an ONNX file (external data resolved relative to its folder)."""
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"{path}: file not found")
        if not path.is_file():
            raise ModelLoadError(f"{path}: not a file")
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{path}: file is empty")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise ModelLoadError(f"{path}: not an ONNX model (cannot parse: {_first_line(exc)})") from None
        if not proto.HasField("graph") or not proto.opset_import:
            raise ModelLoadError(f"{path}: not an ONNX model (no graph or no opset import; truncated?)")
        try:
            onnx.checker.check_model(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path}: invalid ONNX model: {_first_line(exc)}") from None
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot read external data: {_first_line(exc)}") from None
        return cls.from_proto(proto, path=path)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, path: Path | None = None) -> Model:
        """Wrap an in-memory ModelProto (with its tensor data loaded)."""
        meta = ModelMeta(
            opset_imports=[(o.domain, o.version) for o in proto.opset_import],
            doc_string=proto.doc_string,
            model_version=proto.model_version,
            domain=proto.domain,
            metadata_props={p.key: p.value for p in proto.metadata_props},
        )
        graph = gs.import_onnx(proto)
        # gs keeps the proto's opset list; under upb that one reference would keep the whole
        # message (every weight's bytes) alive beside the arrays, so give it fresh copies
        graph.import_domains = [
            onnx.helper.make_opsetid(o.domain, o.version) for o in graph.import_domains or []
        ]
        return cls(graph, meta, path)

    def to_proto(self) -> onnx.ModelProto:
        """Export to a ModelProto with the original model-level fields restored."""
        graph = self.graph
        proto = gs.export_onnx(graph, do_type_check=False)
        imports = dict(self.meta.opset_imports)
        for op in proto.opset_import:  # domains a pass introduced
            imports.setdefault(op.domain, op.version)
        del proto.opset_import[:]
        proto.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in imports.items())
        proto.doc_string = self.meta.doc_string
        proto.model_version = self.meta.model_version
        proto.domain = self.meta.domain
        onnx.helper.set_model_props(proto, self.meta.metadata_props)
        return proto

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> Path:
        """Write atomically to `path`; weights go to `<name>.data` beside it if needed or asked."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        proto = self.to_proto()
        if external_data is None:
            external_data = self.weight_nbytes() > PROTOBUF_LIMIT
        data_name = path.name + ".data"
        tmp = Path(tempfile.mkdtemp(prefix=".sparsegraph-", dir=path.parent))
        try:
            onnx.save_model(
                proto,
                str(tmp / path.name),
                save_as_external_data=external_data,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            if (tmp / data_name).exists():
                os.replace(tmp / data_name, path.parent / data_name)
            elif (path.parent / data_name).exists():
                (path.parent / data_name).unlink()  # stale weights of an earlier save
            os.replace(tmp / path.name, path)
        except OSError as exc:
            raise UsageError(f"{path}: cannot write model: {exc}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def copy(self) -> Model:
        """A deep copy whose graph can be rewritten without touching this one."""
        return Model(self.graph.copy(), copy.deepcopy(self.meta), self.path)

    # ------------------------------------------------------------------- queries
    @property
    def name(self) -> str:
        return self.path.name if self.path else (self.graph.name or "<model>")

    def opset(self, domain: str = "") -> int:
        """The imported opset version of `domain` (ai.onnx when empty), 0 if not imported."""
        return dict(self.meta.opset_imports).get(domain, 0) or (self.graph.opset if domain == "" else 0)

    def constants(self) -> list[gs.Constant]:
        return [t for t in self.graph.tensors().values() if isinstance(t, gs.Constant)]

    def weight_nbytes(self) -> int:
        """Bytes of all constant tensors (without loading lazily held values)."""
        total = 0
        for t in self.constants():
            values = t._values  # LazyValues know their size without loading
            total += int(values.nbytes)
        return total

    def node(self, name: str) -> gs.Node:
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def ensure_node_names(self) -> None:
        """Give unnamed nodes unique names (`<op>_<index>`) so reports can refer to them."""
        taken = {n.name for n in self.graph.nodes if n.name}
        for i, n in enumerate(self.graph.nodes):
            if not n.name:
                name = f"{n.op}_{i}"
                while name in taken:
                    name += "_"
                n.name = name
                taken.add(name)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a `Constant` node's output, else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    node = producer(tensor)
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        value = node.attrs["value"]
        return value.values if isinstance(value, gs.Constant) else np.asarray(value)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
