"""Saving models with qgoft layers for inference without Python (TorchScript, AOTInductor).

Unmerged ``qgoft.nn.Linear`` layers run the compiled ``torch.ops.qgoft`` ops in every form:

* ``torch.jit.script`` / ``torch.jit.trace``: the ops are TorchScript custom ops. A C++ program loads the
  saved module with ``torch::jit::load`` once ``libqgoft_ops.so`` (``qgoft.ops_library_path()``) is linked
  or loaded (see ``examples/cpp_inference``).
* ``torch.export.export`` / ``torch.compile``: the ops have fake (meta) kernels and autograd formulas.
* AOTInductor: the exported program compiles to a ``.pt2`` package whose ``qgoft`` calls go through
  the dispatcher at run time (``torch._inductor.aoti_load_package`` in Python after ``import qgoft``,
  ``torch::inductor::AOTIModelPackageLoader`` in C++ with the ops library linked).

Merged layers (``merge()``) compute a plain ``F.linear``; a merged model still needs the ops to be
scripted, as the scripted forward keeps the unmerged branch.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple, Union

import torch

__all__ = ["save_torchscript", "save_aoti_package"]

PathLike = Union[str, os.PathLike]


def save_torchscript(model: torch.nn.Module, path: PathLike, example: Optional[Any] = None, *,
                     trace: bool = False, check: bool = True) -> torch.jit.ScriptModule:
    """Script ``model`` (or trace it on ``example`` with ``trace=True``), ``torch.jit.save`` it to ``path``
    and return the module loaded back from ``path``.

    ``example`` is one input tensor or a tuple of positional inputs. With ``check`` and an example, the
    reloaded module must reproduce ``model``'s output (within 1e-5), else ``RuntimeError``.
    """
    inputs = example if isinstance(example, tuple) else (example,)
    if trace:
        if example is None:
            raise ValueError("save_torchscript(trace=True) needs an example input")
        scripted = torch.jit.trace(model, inputs)
    else:
        scripted = torch.jit.script(model)
    torch.jit.save(scripted, os.fspath(path))
    loaded = torch.jit.load(os.fspath(path))
    if check and example is not None:
        with torch.no_grad():
            _check_close(loaded(*inputs), model(*inputs), "the saved TorchScript module")
    return loaded


def save_aoti_package(model: torch.nn.Module, path: PathLike, example_inputs: Tuple[Any, ...], *,
                      dynamic_shapes: Optional[Any] = None,
                      inductor_configs: Optional[Dict[str, Any]] = None) -> str:
    """``torch.export.export`` ``model`` on ``example_inputs`` and compile it with AOTInductor into the
    package ``path`` (``.pt2``); returns the package path.

    Load it with ``torch._inductor.aoti_load_package(path)`` (after ``import qgoft``) or from C++ with
    ``torch::inductor::AOTIModelPackageLoader``. Needs a C++ compiler at packaging time.
    """
    import torch._inductor  # noqa: F401  (not imported by ``import torch``)

    program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    return torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(path),
                                                    inductor_configs=inductor_configs)


def _check_close(actual: Any, expected: Any, what: str) -> None:
    try:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    except AssertionError as error:
        raise RuntimeError(f"qgoft.export: {what} does not reproduce the model's output: {error}") from None
