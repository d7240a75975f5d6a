"""sparsegraph: make transformer ONNX models faster and smaller through sparsity.

Python API (the CLI runs the same code)::

    import sparsegraph as sg
    result = sg.compile_model("model.onnx", "recipe.yaml", "out/")   # portable.onnx + report
    model = sg.Model.load("model.onnx")
    ctx = sg.PassManager(sg.Recipe.load("recipe.yaml").steps, seed=0).run(model)
    model.save("pruned.onnx")
"""

from .compile import CompileResult, compile_model, op_summary
from .errors import (
    ModelLoadError,
    PassError,
    RecipeError,
    SparsegraphError,
    UnsupportedOpError,
    UsageError,
    ValidationError,
)
from .model import Model
from .pass_manager import (
    AnalysisPass,
    Change,
    Pass,
    PassConfig,
    PassContext,
    PassManager,
    PassResult,
    RewritePass,
    get_pass,
    register,
    registry,
)
from .recipe import Recipe

__version__ = "0.1.0"

__all__ = [
    "AnalysisPass",
    "Change",
    "CompileResult",
    "Model",
    "ModelLoadError",
    "Pass",
    "PassConfig",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "Recipe",
    "RecipeError",
    "RewritePass",
    "SparsegraphError",
    "UnsupportedOpError",
    "UsageError",
    "ValidationError",
    "compile_model",
    "get_pass",
    "op_summary",
    "register",
    "registry",
]
