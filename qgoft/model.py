"""Model-level API: inject (q)GOFT adapters into a model, count, regularize, merge, unload, save and load.

    config = QGoftConfig(method="qgoft", target_modules=["query", "key", "value", "dense"],
                         modules_to_save=["classifier"], orthogonality_weight=0.01)
    model = get_qgoft_model(model, config)        # adapts the model in place, returns a QGoftModel wrapper
    model.print_trainable_parameters()
    loss = task_loss + model.orthogonality_penalty()
    model.save_pretrained("adapter/")             # adapter_config.json + adapter_model.safetensors
    plain = model.merge_and_unload()              # the base model with merged weights, no qgoft layers

Every targeted ``torch.nn.Linear`` becomes a :class:`qgoft.nn.Linear` that shares (does not copy) its frozen
weight and bias. A transformers ``Conv1D`` (GPT-2 style, weight stored transposed as ``(in, out)``) becomes a
``qgoft.nn.Linear`` whose weight is the transposed *view* ``(out, in)`` of the Conv1D weight (no copy); it is
turned back into a ``Conv1D`` by :meth:`QGoftModel.merge_and_unload` and :meth:`QGoftModel.unload`. All other
parameters are frozen, except those of ``modules_to_save``, which stay trainable in place.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import layouts as _layouts
from . import serialization as _files
from .config import ALL_LINEAR, QGoftConfig
from .methods import ADAPTER_TORCH_DTYPES, PARAMETER_NAMES, QUASI_METHOD, parameter_shapes
from .nn.input_adapter import InputAdapter, base_description
from .nn.linear import DEFAULT_ADAPTER, GivensAdapterMixin, check_adapter_name
from .nn.linear import Linear as QGoftLinear
from .serialization import KIND_CONV1D, KIND_LINEAR, AdapterFormatError, is_known_kind

__all__ = ["QGoftModel", "get_qgoft_model", "LayerSpec"]

# Layers whose input features are not in the last dimension (or that read their weight instead of being
# called): qgoft refuses them by name, also when custom_modules names their class.
_NOT_LAST_DIM = (nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention,
                 nn.modules.batchnorm._NormBase, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _conv1d_class() -> Optional[type]:
    """transformers' ``Conv1D`` if transformers is already imported (a model holding one imported it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def _is_conv1d(module: nn.Module) -> bool:
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def _is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` qgoft.nn.Linear can share: dense weight, ``nn.Linear``'s own forward."""
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and type(module.weight) in (torch.Tensor, nn.Parameter))


def _layer_kind(module: nn.Module, config: QGoftConfig) -> Tuple[Optional[str], int, str]:
    """``(kind, in_features, "")`` for a layer qgoft can adapt, ``(None, 0, reason)`` otherwise.

    ``"linear"``: a plain ``nn.Linear`` (``qgoft.nn.Linear`` shares its weight); ``"conv1d"``: transformers'
    ``Conv1D``; anything else that takes ``(..., d)`` (an ``nn.Linear`` with a quantized weight or its own
    forward, e.g. torchao or bitsandbytes, or a class named in ``config.custom_modules``) is wrapped by
    ``qgoft.nn.InputAdapter`` and its kind says what it is (:func:`qgoft.nn.input_adapter.base_description`)."""
    name = type(module).__name__
    if isinstance(module, _NOT_LAST_DIM):
        return None, 0, (f"{name} does not take its input features in the last dimension (or reads its weight "
                         "directly instead of being called)")
    custom = config.custom_modules or {}
    if name in custom:
        width = custom[name]
        value = width if isinstance(width, int) else getattr(module, width, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            return None, 0, (f"custom_modules[{name!r}] = {width!r} gives input width {value!r}; it must be an int "
                             ">= 2")
        return base_description(module), value, ""
    if isinstance(module, nn.Linear):
        if _is_plain_linear(module):
            return KIND_LINEAR, int(module.in_features), ""
        return base_description(module), int(module.in_features), ""
    if _is_conv1d(module):
        return KIND_CONV1D, int(module.weight.shape[0]), ""
    return None, 0, (f"qgoft does not know the input width of {name}; name its class in "
                     "QGoftConfig.custom_modules={'" + name + "': '<width attribute>'}")


def _out_features(module: nn.Module, kind: str) -> int:
    """Output width of a supported layer (0 when a wrapped custom module does not say)."""
    if kind == KIND_CONV1D:
        return int(module.weight.shape[1])
    value = getattr(module, "out_features", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def layout_fingerprint(layout: _layouts.Layout) -> str:
    """SHA-256 of the layout's canonical pairs and layer offsets (int32 little-endian bytes)."""
    digest = hashlib.sha256()
    digest.update(layout.pairs_tensor().numpy().astype("<i4").tobytes())
    digest.update(layout.layer_offsets_tensor().numpy().astype("<i4").tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class LayerSpec:
    """One adapted layer: dotted ``path``, ``kind`` (``"linear"`` or ``"conv1d"``), shapes and layout."""

    path: str
    kind: str
    in_features: int
    out_features: int
    bias: bool
    layout: _layouts.Layout

    def describe(self, method: str) -> Dict[str, Any]:
        """The JSON-safe description written to ``adapter_config.json`` (``layers[path]``)."""
        return {
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "layout": {
                "name": self.layout.name,
                "d": self.layout.d,
                "num_layers": self.layout.num_layers,
                "num_pairs": self.layout.num_pairs,
                "sha256": layout_fingerprint(self.layout),
            },
            "parameters": parameter_shapes(method, self.layout.num_pairs, self.in_features),
        }


@dataclass
class _Plan:
    layers: List[LayerSpec]
    modules_to_save: List[str]


def _output_embedding_module(model: nn.Module) -> Optional[nn.Module]:
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        module = getter()
    except Exception:  # noqa: BLE001 - some models raise NotImplementedError here
        return None
    return module if isinstance(module, nn.Module) else None


def _inside(path: str, ancestors: Sequence[str]) -> bool:
    return any(path == a or path.startswith(a + ".") for a in ancestors)


def _modules_to_save_paths(model: nn.Module, config: QGoftConfig) -> List[str]:
    """Paths of the modules ``config.modules_to_save`` selects (outermost ones); ValueError when an entry
    matches nothing."""
    save_paths: List[str] = []
    if config.modules_to_save is None:
        return save_paths
    for path, _ in model.named_modules():
        if path and config.matches_modules_to_save(path) and not _inside(path, save_paths):
            save_paths.append(path)
    if isinstance(config.modules_to_save, list):
        module_paths = [path for path, _ in model.named_modules() if path]
        for name in config.modules_to_save:
            if not any(p == name or p.endswith("." + name) for p in module_paths):
                raise ValueError(f"modules_to_save entry {name!r} matches no module of {type(model).__name__}")
    elif not save_paths:
        raise ValueError(f"modules_to_save regex {config.modules_to_save!r} matches no module of "
                         f"{type(model).__name__}")
    return save_paths


def plan_adaptation(model: nn.Module, config: QGoftConfig) -> _Plan:
    """Decide which layers ``config`` adapts in ``model`` and which modules it saves, without touching
    ``model``. Raises ValueError (nothing changed) when no layer matches, a ``modules_to_save`` entry matches
    no module, the model already holds qgoft layers, or a target is shared by several paths or has
    ``in_features < 2``. Modules to save nested in another module to save are covered by the outer one."""
    all_paths: Dict[int, List[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        all_paths.setdefault(id(module), []).append(path)
        if isinstance(module, GivensAdapterMixin):
            raise ValueError(f"the model already contains qgoft layers (e.g. {path!r}); adapt a model once "
                             "(QGoftModel.unload() or merge_and_unload() give back a plain model)")

    save_paths = _modules_to_save_paths(model, config)
    output_embeddings = _output_embedding_module(model) if config.target_modules == ALL_LINEAR else None
    layers: List[LayerSpec] = []
    matched_unsupported: List[str] = []
    for path, module in model.named_modules():
        if not path or not config.matches_target(path) or config.matches_exclude(path):
            continue
        if _inside(path, save_paths):
            continue
        kind, in_features, reason = _layer_kind(module, config)
        if kind is None:
            explicit = isinstance(config.target_modules, list) and not any(module.children())
            if explicit or type(module).__name__ in (config.custom_modules or {}):
                raise ValueError(f"target module {path!r} ({type(module).__name__}) cannot be adapted: {reason}")
            if config.target_modules != ALL_LINEAR:
                matched_unsupported.append(f"{path} ({type(module).__name__})")
            continue
        if module is output_embeddings:
            continue
        if len(all_paths[id(module)]) > 1:
            raise ValueError(f"module {path!r} is shared by the paths {all_paths[id(module)]}; qgoft cannot "
                             "adapt a module registered at several places")
        out_features = _out_features(module, kind)
        if in_features < 2:
            raise ValueError(f"module {path!r} has in_features={in_features}; a Givens adapter needs >= 2 "
                             "(exclude it with exclude_modules)")
        layout = _layouts.get_layout(config.layout, in_features, config.stack)
        bias = getattr(module, "bias", None)
        layers.append(LayerSpec(path, kind, in_features, out_features, isinstance(bias, Tensor), layout))

    if not layers:
        hint = (f" It matched only unsupported modules: {matched_unsupported[:8]}." if matched_unsupported
                else "")
        raise ValueError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matches no "
            f"torch.nn.Linear, transformers Conv1D or custom_modules layer of {type(model).__name__}.{hint} Names are matched "
            "against the end of the dotted module path (e.g. 'query' or 'attention.self.query'), a string is a "
            "regex matched in full against the path.")
    return _Plan(layers, save_paths)


BASE_ROWS = "__base__"
"""``adapter_names`` entry for rows that use no adapter (the base layers; modules to save as active)."""


def _scatter_rows(parts: List[Tuple[Tensor, Tensor]], batch: int) -> Tensor:
    """Rows ``(index, values)`` of several groups back into one tensor of ``batch`` rows."""
    first = parts[0][1]
    out = first.new_empty((batch,) + tuple(first.shape[1:]))
    for index, values in parts:
        out = out.index_copy(0, index.to(values.device), values)
    return out


def _check_batch(x: Tensor, batch: int, where: str) -> None:
    if x.dim() < 2 or x.shape[0] != batch:
        raise ValueError(f"adapter_names has {batch} entries but the input of {where} has shape {tuple(x.shape)}; "
                         "the first dimension must be the batch")


class _RowwiseLayer:
    """An adapted layer's forward for one ``adapter_names`` call: each group of rows through its adapter."""

    def __init__(self, layer: nn.Module, groups: Dict[str, Tensor], batch: int) -> None:
        self.layer, self.groups, self.batch = layer, groups, batch

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        layer = self.layer
        _check_batch(x, self.batch, type(layer).__name__)
        base = layer.base_layer if isinstance(layer, InputAdapter) else (
            lambda rows: torch.nn.functional.linear(rows, layer.weight, layer.bias))
        parts = []
        for name, index in self.groups.items():
            rows = x.index_select(0, index.to(x.device))
            if name != BASE_ROWS:
                holder = layer if name == layer.active_adapter else layer.qgoft_adapters[name]
                rows = holder._chain(rows)
            parts.append((index, base(rows, *args, **kwargs) if isinstance(layer, InputAdapter) else base(rows)))
        return _scatter_rows(parts, self.batch)


class _RowwiseModule:
    """A module to save's forward for one ``adapter_names`` call: each group of rows through its adapter's copy."""

    def __init__(self, module: nn.Module, copies: Dict[str, nn.Module], groups: Dict[str, Tensor],
                 batch: int) -> None:
        self.module, self.copies, self.groups, self.batch = module, copies, groups, batch

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        _check_batch(x, self.batch, type(self.module).__name__)
        own = type(self.module).forward.__get__(self.module)
        parts = []
        for name, index in self.groups.items():
            rows = x.index_select(0, index.to(x.device))
            run = self.copies[name] if name in self.copies else own
            parts.append((index, run(rows, *args, **kwargs)))
        return _scatter_rows(parts, self.batch)


def _get_submodule_parent(model: nn.Module, path: str) -> Tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def _linear_view_of_conv1d(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` whose weight is the ``(out, in)`` transposed view of the Conv1D's ``(in, out)``
    weight (shared storage) and whose bias is the Conv1D's bias Parameter."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta",
                       dtype=conv.weight.dtype)
    linear.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=False)
    linear.bias = conv.bias
    linear.train(conv.training)
    return linear


def _plain_layer(kind: str, weight: Tensor, bias: Optional[nn.Parameter], training: bool) -> nn.Module:
    """A plain ``nn.Linear`` (weight ``(out, in)``) or ``Conv1D`` (stores ``weight.t()``) around the given
    tensors, built without running any initializer (the global RNG is not consumed)."""
    out_features, in_features = weight.shape
    if kind == KIND_CONV1D:
        conv_cls = _conv1d_class()
        layer = conv_cls.__new__(conv_cls)
        nn.Module.__init__(layer)
        layer.nf, layer.nx = out_features, in_features
        layer.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
        if bias is None:
            raise ValueError("a Conv1D needs a bias")
        layer.bias = bias
    else:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
        layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        layer.bias = bias
    layer.train(training)
    return layer


def _is_sharded(tensor: Tensor) -> bool:
    """A DTensor (FSDP2 shard): its full value is gathered with ``full_tensor()``, a collective."""
    return hasattr(tensor, "full_tensor")


class QGoftModel(nn.Module):
    """A model with (q)GOFT adapters, wrapping ``base_model`` (adapted in place).

    ``forward``/``__call__`` forward every argument to ``base_model``; unknown attributes are looked up on
    ``base_model`` (so ``model.config``, ``model.generate`` etc. keep working). The qgoft configuration is
    ``qgoft_config``. Use :func:`get_qgoft_model` or :meth:`from_pretrained` to build one.

    Notes:
        * ``modules_to_save`` are trained in place: :meth:`disable_adapter` / :meth:`disable_adapters` switch
          off the Givens adapters only, not the trained modules to save.
        * Adapter parameters live in ``adapter_dtype`` (float32 by default, also for bf16/fp16 models).
    """

    def __init__(self, model: nn.Module, config: QGoftConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        if isinstance(model, QGoftModel):
            raise ValueError("model is already a QGoftModel")
        if not isinstance(config, QGoftConfig):
            raise TypeError(f"config must be a QGoftConfig, got {type(config).__name__}")
        check_adapter_name(adapter_name)
        config.validate()
        plan = plan_adaptation(model, config)  # raises before anything is changed
        self.base_model = model
        self._active_adapter = adapter_name
        self._adapter_configs: Dict[str, QGoftConfig] = {adapter_name: config}
        self._layer_kinds: Dict[str, str] = {}
        self._modules_to_save: List[str] = list(plan.modules_to_save)
        self._inject(plan)

    # ------------------------------------------------------------------------------------------------
    # Construction.
    # ------------------------------------------------------------------------------------------------

    def _inject(self, plan: _Plan) -> None:
        config = self.qgoft_config
        model = self.base_model
        model.requires_grad_(False)
        for spec in plan.layers:
            parent, name = _get_submodule_parent(model, spec.path)
            original = getattr(parent, name)
            adapted: nn.Module
            if spec.kind in (KIND_LINEAR, KIND_CONV1D):
                linear = _linear_view_of_conv1d(original) if spec.kind == KIND_CONV1D else original
                adapted = QGoftLinear.from_linear(linear, method=config.method, layout=spec.layout,
                                                  adapter_dtype=config.torch_adapter_dtype)
            else:
                adapted = InputAdapter(original, spec.in_features, method=config.method, layout=spec.layout,
                                       adapter_dtype=config.torch_adapter_dtype)
            adapted.__dict__["_active_adapter"] = self._active_adapter
            setattr(parent, name, adapted)
            self._layer_kinds[spec.path] = spec.kind
        for path in self._modules_to_save:
            model.get_submodule(path).requires_grad_(True)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """``base_model(*args, **kwargs)``. ``adapter_names`` (one name per row of the batch, i.e. per index of
        the first dimension of every adapted layer's input; ``"__base__"`` for no adapter) runs each row
        through its own adapter and modules to save, for serving several tasks in one batch; without it
        (the default) nothing is added to the forward."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        return self._mixed_forward(list(adapter_names), args, kwargs)

    def _mixed_forward(self, names: List[str], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        unknown = sorted(set(names) - set(self._adapter_configs) - {BASE_ROWS})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapters {unknown}; this model has {self.adapter_names()}")
        merged = [path for path, layer in self.named_qgoft_layers() if layer.merged]
        if merged:
            raise RuntimeError("adapter_names needs unmerged layers; call unmerge_adapter() first")
        groups: Dict[str, Tensor] = {}
        for row, name in enumerate(names):
            groups.setdefault(name, []).append(row)
        groups = {name: torch.tensor(rows) for name, rows in groups.items()}
        patched: List[nn.Module] = []
        try:
            for _, layer in self.named_qgoft_layers():
                layer.forward = _RowwiseLayer(layer, groups, len(names))
                patched.append(layer)
            store = self._modules.get("qgoft_saved_modules")
            for i, path in enumerate(self._modules_to_save):
                module = self.base_model.get_submodule(path)
                copies = {name: store[name][str(i)] for name in groups
                          if name not in (self._active_adapter, BASE_ROWS)}
                module.forward = _RowwiseModule(module, copies, groups, len(names))
                patched.append(module)
            return self.base_model(*args, **kwargs)
        finally:
            for module in patched:
                del module.forward

    def get_base_model(self) -> nn.Module:
        """The wrapped (adapted) model."""
        return self.base_model

    # ------------------------------------------------------------------------------------------------
    # Introspection.
    # ------------------------------------------------------------------------------------------------

    def named_qgoft_layers(self) -> Iterator[Tuple[str, Any]]:
        """``(path, layer)`` for every adapted layer (a ``qgoft.nn.Linear`` or ``qgoft.nn.InputAdapter``),
        paths relative to ``base_model``."""
        for path, module in self.base_model.named_modules():
            if isinstance(module, (QGoftLinear, InputAdapter)):
                yield path, module

    def layer_specs(self) -> List[LayerSpec]:
        """A :class:`LayerSpec` for every adapted layer (what ``save_pretrained`` describes)."""
        specs = []
        for path, layer in self.named_qgoft_layers():
            specs.append(LayerSpec(path, self._layer_kinds.get(path, KIND_LINEAR), layer.in_features,
                                   layer.out_features or 0, layer.bias is not None, layer.layout))
        return specs

    @property
    def modules_to_save_paths(self) -> List[str]:
        """Dotted paths (relative to ``base_model``) of the modules to save."""
        return list(self._modules_to_save)

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """The Givens adapter parameters of every adapted layer (not the modules to save)."""
        for _, layer in self.named_qgoft_layers():
            yield from layer.adapter_parameters()

    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        """``(trainable, total)`` numbers of parameter scalars (each shared tensor counted once)."""
        trainable = total = 0
        seen = set()
        for param in self.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: X || all params: Y || trainable%: Z`` (PEFT's wording)."""
        trainable, total = self.get_nb_trainable_parameters()
        percent = 100.0 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")

    # ------------------------------------------------------------------------------------------------
    # Named adapters (PEFT style). Every adapter adapts the same layers and has the same modules to save;
    # methods and layouts may differ. The active adapter's tensors sit in the layers and in the model (so
    # training, merging, forward see one adapter); the others wait in the layers' ``qgoft_adapters`` and,
    # for modules to save, in ``qgoft_saved_modules`` (their own copies).
    # ------------------------------------------------------------------------------------------------

    @property
    def qgoft_config(self) -> QGoftConfig:
        """The active adapter's configuration."""
        return self._adapter_configs[self._active_adapter]

    @qgoft_config.setter
    def qgoft_config(self, config: QGoftConfig) -> None:
        self._adapter_configs[self._active_adapter] = config

    @property
    def qgoft_configs(self) -> Dict[str, QGoftConfig]:
        """``{adapter name: config}`` of every adapter (PEFT's ``peft_config``)."""
        return dict(self._adapter_configs)

    @property
    def active_adapter(self) -> str:
        """Name of the adapter in use (``"default"`` unless named otherwise)."""
        return self._active_adapter

    def adapter_names(self) -> List[str]:
        """Every adapter's name, the active one first."""
        return [self._active_adapter] + [n for n in self._adapter_configs if n != self._active_adapter]

    def _check_adapter_exists(self, name: str) -> None:
        if name not in self._adapter_configs:
            raise ValueError(f"no adapter named {name!r}; this model has {self.adapter_names()}")

    def add_adapter(self, adapter_name: str, config: QGoftConfig) -> None:
        """Add an identity-initialized adapter ``adapter_name`` described by ``config`` (any method, layout,
        stack); it stays inactive (frozen) until :meth:`set_adapter`. ``config`` must target the same layers
        and name the same modules to save as the existing adapters; its modules to save start as copies of
        the active adapter's. Raises ValueError, changing nothing, otherwise."""
        check_adapter_name(adapter_name)
        if adapter_name in self._adapter_configs:
            raise ValueError(f"an adapter named {adapter_name!r} exists already")
        if not isinstance(config, QGoftConfig):
            raise TypeError(f"config must be a QGoftConfig, got {type(config).__name__}")
        config.validate()
        layers = dict(self.named_qgoft_layers())
        targeted = {path for path in layers if config.matches_target(path) and not config.matches_exclude(path)}
        if targeted != set(layers):
            raise ValueError(f"adapter {adapter_name!r}: every adapter of a QGoftModel adapts the same layers; its "
                             f"target_modules miss {sorted(set(layers) - targeted)[:6]}")
        save_paths = _modules_to_save_paths(self.base_model, config)
        if sorted(save_paths) != sorted(self._modules_to_save):
            raise ValueError(f"adapter {adapter_name!r}: modules_to_save select {sorted(save_paths)}, the model's "
                             f"adapters have {sorted(self._modules_to_save)} (they must be the same)")
        layouts = {path: _layouts.get_layout(config.layout, layer.in_features, config.stack)
                   for path, layer in layers.items()}
        # Validated: from here on nothing fails.
        for path, layer in layers.items():
            layer.add_adapter(adapter_name, config.method, layouts[path], 1, config.torch_adapter_dtype)
            layer.qgoft_adapters[adapter_name].requires_grad_(False)
        if self._modules_to_save:
            copies = nn.ModuleDict({str(i): copy.deepcopy(self.base_model.get_submodule(path))
                                    for i, path in enumerate(self._modules_to_save)})
            copies.requires_grad_(False)
            self._saved_module_store()[adapter_name] = copies
        self._adapter_configs[adapter_name] = config

    def _saved_module_store(self) -> nn.ModuleDict:
        if "qgoft_saved_modules" not in self._modules:
            self.add_module("qgoft_saved_modules", nn.ModuleDict())
        return self.qgoft_saved_modules

    def _activate(self, adapter_name: str) -> None:
        """Swap ``adapter_name``'s tensors into the layers and modules to save (no copies, no grad changes)."""
        if adapter_name == self._active_adapter:
            return
        merged = [path for path, layer in self.named_qgoft_layers() if layer.merged]
        if merged:
            raise RuntimeError(f"cannot switch adapters while the active adapter {self._active_adapter!r} is "
                               f"merged (e.g. {merged[0]!r}); unmerge_adapter() first")
        for _, layer in self.named_qgoft_layers():
            layer.set_adapter(adapter_name)
        if self._modules_to_save:
            store = self._saved_module_store()
            incoming = store[adapter_name]
            del store[adapter_name]
            outgoing = nn.ModuleDict()
            for i, path in enumerate(self._modules_to_save):
                parent, name = _get_submodule_parent(self.base_model, path)
                outgoing[str(i)] = getattr(parent, name)
                setattr(parent, name, incoming[str(i)])
            store[self._active_adapter] = outgoing
        self._active_adapter = adapter_name

    def _freeze_inactive(self) -> None:
        for _, layer in self.named_qgoft_layers():
            slots = layer._modules.get("qgoft_adapters")
            if slots is not None:
                slots.requires_grad_(False)
        if "qgoft_saved_modules" in self._modules:
            self.qgoft_saved_modules.requires_grad_(False)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter: forward, training, merging and ``save_pretrained``'s top
        level use it. It becomes trainable if the previously active one was; the others are frozen. Raises
        ValueError for an unknown name and RuntimeError while merged (nothing changed)."""
        self._check_adapter_exists(adapter_name)
        trainable = any(p.requires_grad for p in self.adapter_parameters())
        self._activate(adapter_name)
        for param in self.adapter_parameters():
            param.requires_grad_(trainable)
        for path in self._modules_to_save:
            self.base_model.get_submodule(path).requires_grad_(trainable)
        self._freeze_inactive()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter ``adapter_name``; the active adapter cannot be deleted (ValueError)."""
        self._check_adapter_exists(adapter_name)
        if adapter_name == self._active_adapter:
            raise ValueError(f"cannot delete the active adapter {adapter_name!r}; set_adapter() another one "
                             f"first (adapters: {self.adapter_names()})")
        for _, layer in self.named_qgoft_layers():
            layer.delete_adapter(adapter_name)
        if "qgoft_saved_modules" in self._modules and adapter_name in self.qgoft_saved_modules:
            del self.qgoft_saved_modules[adapter_name]
        del self._adapter_configs[adapter_name]

    # ------------------------------------------------------------------------------------------------
    # Training helpers.
    # ------------------------------------------------------------------------------------------------

    def orthogonality_penalty(self) -> Tensor:
        """``lambda * sum_layers sum_p <alpha_p, beta_p>^2`` with ``lambda = orthogonality_weight``: a
        differentiable scalar (adapter dtype and device) to add to the loss. Zero for goft/goft_scaled."""
        layers = [layer for _, layer in self.named_qgoft_layers()]
        first = next(layers[0].adapter_parameters()) if layers else None
        weight = self.qgoft_config.orthogonality_weight
        if first is None or self.qgoft_config.method != QUASI_METHOD or weight == 0.0:
            return torch.zeros((), dtype=first.dtype if first is not None else torch.float32,
                               device=first.device if first is not None else None)
        total = torch.stack([layer.orthogonality_penalty().to(first.device) for layer in layers]).sum()
        if hasattr(total, "full_tensor"):
            # FSDP2 (fully_shard) outside forward: the blocks are sharded DTensors and so is this sum; the
            # loss it is added to is a plain tensor. full_tensor() all-reduces it (differentiably).
            total = total.full_tensor()
        return weight * total

    def enable_adapters(self) -> None:
        """Apply the Givens adapters in forward (the default)."""
        for _, layer in self.named_qgoft_layers():
            layer.enable_adapters()

    def disable_adapters(self) -> None:
        """Make every adapted layer compute its base layer only (modules to save are unaffected)."""
        for _, layer in self.named_qgoft_layers():
            layer.disable_adapters()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base layers inside, restore each layer's previous state on exit."""
        previous = [(layer, layer.adapters_enabled) for _, layer in self.named_qgoft_layers()]
        try:
            for layer, _ in previous:
                layer.disable_adapters()
            yield
        finally:
            for layer, enabled in previous:
                if enabled:
                    layer.enable_adapters()
                else:
                    layer.disable_adapters()

    # ------------------------------------------------------------------------------------------------
    # Merging.
    # ------------------------------------------------------------------------------------------------

    def _check_mergeable(self, what: str) -> None:
        """Raise RuntimeError (nothing changed) naming every adapted layer whose base cannot be merged into."""
        refusals = [f"{path}: {reason}" for path, layer in self.named_qgoft_layers()
                    if isinstance(layer, InputAdapter) and (reason := layer.merge_refusal())]
        if refusals:
            raise RuntimeError(f"{what} refused, nothing was changed: {len(refusals)} adapted layer(s) cannot be "
                               f"merged into their base ({'; '.join(refusals[:4])}). unload() gives back the "
                               "base layers without the adapter.")

    def merge_adapter(self) -> Dict[str, float]:
        """Merge every adapter into its base weight (``W_lin S R^T``), reversibly; skip merged layers.

        Quantized bases (``qgoft.nn.InputAdapter``) are requantized; the result maps their paths to the
        relative error of the merged forward against the unmerged one (see ``InputAdapter.merge``). Raises
        RuntimeError before changing anything when a layer's base cannot be merged into."""
        self._check_mergeable("merge_adapter()")
        errors: Dict[str, float] = {}
        for path, layer in self.named_qgoft_layers():
            if not layer.merged:
                error = layer.merge()
                if error is not None:
                    errors[path] = error
        return errors

    def unmerge_adapter(self) -> None:
        """Restore every merged base weight bitwise; skip unmerged layers."""
        for _, layer in self.named_qgoft_layers():
            if layer.merged:
                layer.unmerge()

    def _replace_layers(self, merge: bool) -> nn.Module:
        model = self.base_model
        if merge:
            self._check_mergeable("merge_and_unload()")
        self.merge_errors: Dict[str, float] = {}
        for path, layer in list(self.named_qgoft_layers()):
            kind = self._layer_kinds.get(path, KIND_LINEAR)
            plain: nn.Module
            if isinstance(layer, InputAdapter):
                if merge and not layer.merged:
                    self.merge_errors[path] = layer.merge()
                elif merge and layer.merge_error is not None:
                    self.merge_errors[path] = layer.merge_error
                elif not merge and layer.merged:
                    layer.unmerge()
                plain = layer.base_layer
            else:
                with torch.no_grad():
                    if merge:
                        weight: Tensor = nn.Parameter(layer.merged_weight().to(layer.weight.dtype),
                                                      requires_grad=False)
                    else:
                        if layer.merged:
                            layer.unmerge()
                        weight = layer.weight
                plain = _plain_layer(kind, weight, layer.bias, layer.training)
            parent, name = _get_submodule_parent(model, path)
            setattr(parent, name, plain)
        self._layer_kinds.clear()
        return model

    def merge_and_unload(self) -> nn.Module:
        """Replace every adapted layer by a plain ``nn.Linear`` (or ``Conv1D``) holding the merged weight and
        return ``base_model``. Outputs match the adapted model (float rounding of the merge only). Whatever
        the enabled/disabled state, the adapter is merged. This QGoftModel has no adapted layer afterwards.

        A quantized base (torchao) gets its requantized merged weight; ``self.merge_errors`` maps its path to
        the relative error against the unmerged forward. When any layer's base cannot be merged into
        (bitsandbytes, custom modules), raises RuntimeError and changes nothing."""
        return self._replace_layers(merge=True)

    def unload(self) -> nn.Module:
        """Replace every adapted layer by its original plain layer (original weights, unmerged) and return
        ``base_model``. This QGoftModel has no adapted layer afterwards."""
        return self._replace_layers(merge=False)

    # ------------------------------------------------------------------------------------------------
    # Save / load (see qgoft.serialization for the format).
    # ------------------------------------------------------------------------------------------------

    def get_adapter_state_dict(self) -> Dict[str, Tensor]:
        """What ``save_pretrained`` stores: ``"<path>.<adapter param>"`` for every adapted layer and
        ``"<path>.<state key>"`` for every module to save (detached tensors, not copies)."""
        state: Dict[str, Tensor] = {}
        for path, layer in self.named_qgoft_layers():
            for name in PARAMETER_NAMES:
                param = getattr(layer, name)
                if param is not None:
                    state[f"{path}.{name}"] = param.detach()
        for path in self._modules_to_save:
            for key, value in self.base_model.get_submodule(path).state_dict().items():
                state[f"{path}.{key}"] = value.detach()
        return state

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[Sequence[str]] = None) -> None:
        """Write each adapter (all, or ``selected_adapters``) as ``adapter_config.json`` and
        ``adapter_model.safetensors``: the one named ``"default"`` into ``save_directory`` itself, the others
        into subfolders named after them (as PEFT does). Only adapter parameters and modules to save are
        stored; no pickle. Each directory is written as below; the subfolders first, so the top
        level's swap keeps them.

        Crash-safe: the directory is replaced as a whole in one atomic step (see ``qgoft.serialization``), so
        it always holds the complete previous or the complete new adapter; other files in it are kept. On a
        model sharded with FSDP2 (``fully_shard``) call it on every rank: the adapter is gathered, rank 0
        writes it and the other ranks wait until it is written."""
        names = self.adapter_names() if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_adapter_exists(name)
        names.sort(key=lambda name: name == DEFAULT_ADAPTER)  # the top level last
        if names == [self._active_adapter]:
            self._save_active(self.adapter_save_directory(save_directory, names[0]))
            return
        active = self._active_adapter
        try:
            for name in names:
                self._activate(name)
                self._save_active(self.adapter_save_directory(save_directory, name))
        finally:
            self._activate(active)

    @staticmethod
    def adapter_save_directory(save_directory: str, adapter_name: str) -> str:
        """Where :meth:`save_pretrained` puts adapter ``adapter_name``: ``save_directory`` itself for
        ``"default"``, the subfolder named after it otherwise."""
        root = os.fspath(save_directory)
        return root if adapter_name == DEFAULT_ADAPTER else os.path.join(root, check_adapter_name(adapter_name))

    def adapters_sharded(self) -> bool:
        """Whether the active adapter's tensors are sharded DTensors (FSDP2): then :meth:`save_pretrained` is
        a collective that every rank must call."""
        return any(_is_sharded(value) for value in self.get_adapter_state_dict().values())

    def _save_active(self, save_directory: str) -> None:
        state = self.get_adapter_state_dict()
        sharded = any(_is_sharded(value) for value in state.values())
        if sharded:
            # DTensors (FSDP2): gathering is a collective, so every rank takes part.
            state = {key: value.full_tensor() if _is_sharded(value) else value for key, value in state.items()}
        distributed = sharded and torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        error: Optional[BaseException] = None
        if rank == 0:
            try:
                # Distinct contiguous CPU copies: safetensors refuses shared or non-contiguous storage.
                tensors = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}
                _files.write_adapter(save_directory, self._describe(tensors), tensors)
            except BaseException as err:  # noqa: BLE001 - re-raised after the other ranks are released
                error = err
        if distributed:
            torch.distributed.barrier()
        if error is not None:
            raise error

    def _describe(self, tensors: Dict[str, Tensor]) -> Dict[str, Any]:
        """The model part of ``adapter_config.json`` (qgoft.serialization adds the format fields)."""
        modules_to_save: Dict[str, Dict[str, Any]] = {}
        for path in self._modules_to_save:
            modules_to_save[path] = {
                key: {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
                for key, value in ((k, tensors[f"{path}.{k}"]) for k in
                                   self.base_model.get_submodule(path).state_dict())}
        config = self.qgoft_config
        return {
            "base_model_class": type(self.base_model).__name__,
            "config": config.to_dict(),
            "layers": {spec.path: spec.describe(config.method) for spec in self.layer_specs()},
            "modules_to_save": modules_to_save,
        }

    def load_adapter(self, adapter_directory: str, adapter_name: Optional[str] = None, *,
                     is_trainable: bool = True) -> None:
        """Load a saved adapter into the active adapter (``adapter_name`` None or the active one's name), into
        the existing inactive adapter ``adapter_name``, or as a new adapter ``adapter_name`` (added with the
        saved configuration; the active adapter does not change, as in PEFT; inactive adapters stay frozen).
        On any error the new adapter is removed again and the model is as it was.

        Loading into the active adapter:

        The saved adapter must describe exactly this model's adapted layers (paths, shapes, method, layout)
        and modules to save. Everything is validated before anything changes, and the tensor data is read only
        once its description matches this model; on error (``qgoft.serialization.AdapterFormatError``, a
        ValueError, or FileNotFoundError) the model is unchanged. Merged layers must be unmerged first."""
        if adapter_name is None or adapter_name == self._active_adapter:
            self._load_into_active(adapter_directory, is_trainable)
            return
        check_adapter_name(adapter_name)
        added = adapter_name not in self._adapter_configs
        if added:
            with _files.open_adapter(adapter_directory) as files:
                config = files.saved.config
            self.add_adapter(adapter_name, config)
        active = self._active_adapter
        try:
            self._activate(adapter_name)
            self._load_into_active(adapter_directory, is_trainable)
        except BaseException:
            self._activate(active)
            if added:
                self.delete_adapter(adapter_name)
            raise
        self._activate(active)
        self._freeze_inactive()

    def _load_into_active(self, adapter_directory: str, is_trainable: bool) -> None:
        with _files.open_adapter(adapter_directory) as files:
            saved = files.saved
            where = saved.config_path
            merged = [path for path, layer in self.named_qgoft_layers() if layer.merged]
            _require(not merged, where, f"cannot load into merged layers {merged[:4]}; call unmerge_adapter() first")
            methods = {layer.method for _, layer in self.named_qgoft_layers()}
            _require(methods == {saved.config.method}, where,
                     f"the adapter's method is {saved.config.method!r}, this model's layers use {sorted(methods)}")
            _check_layers(saved, self.layer_specs(), "this QGoftModel")
            _check_modules_to_save(saved, self.base_model, self.modules_to_save_paths, "this QGoftModel")
            for path, layer in self.named_qgoft_layers():
                for name in saved.layers[path]["parameters"]:
                    target = getattr(layer, name)
                    _require(target is not None and target.dtype in ADAPTER_TORCH_DTYPES, where,
                             f"layer {path!r} has no float adapter parameter {name!r}")
            files.read_tensors()
        _copy_into(self, saved)
        self.qgoft_config = saved.config
        _set_trainable(self, is_trainable)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_directory: str, *, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False) -> "QGoftModel":
        """Adapt ``model`` (a fresh base model) as described by a saved adapter and load its tensors.

        The result reproduces the saved model's outputs bitwise (same base weights, same dtypes). With
        ``is_trainable=False`` (default, like PEFT) adapter and modules-to-save parameters are frozen and the
        model is put in eval mode. Everything is validated before ``model`` is touched, and the tensor data is
        read only once its description matches ``model``: on error (``qgoft.serialization.AdapterFormatError``,
        a ValueError, or FileNotFoundError, naming the file and the problem) ``model`` is unchanged. Adapters
        of earlier format versions load with a ``FormatMigrationWarning``. The adapter is named
        ``adapter_name``; others saved in subfolders load with :meth:`load_adapter`."""
        if isinstance(model, QGoftModel):
            raise ValueError("from_pretrained expects a plain base model, got a QGoftModel (use load_adapter)")
        with _files.open_adapter(adapter_directory) as files:
            saved = files.saved
            try:
                plan = plan_adaptation(model, saved.config)
            except ValueError as err:
                raise AdapterFormatError(f"{saved.config_path}: the adapter does not fit "
                                         f"{type(model).__name__}: {err}") from None
            _check_layers(saved, plan.layers, f"this {type(model).__name__}")
            _check_modules_to_save(saved, model, plan.modules_to_save, f"this {type(model).__name__}")
            files.read_tensors()
        # Everything is validated: from here on nothing can fail.
        adapted = cls(model, saved.config, adapter_name)
        _copy_into(adapted, saved)
        _set_trainable(adapted, is_trainable)
        return adapted

    def extra_repr(self) -> str:
        c = self.qgoft_config
        text = (f"method={c.method!r}, layout={c.layout!r}, stack={c.stack}, "
                f"adapted_layers={len(self._layer_kinds)}, modules_to_save={self._modules_to_save}")
        if len(self._adapter_configs) > 1:
            text += f", active_adapter={self._active_adapter!r}, adapters={self.adapter_names()}"
        return text


# ------------------------------------------------------------------------------------------------
# Checking a saved adapter against a model, and copying it in.
# ------------------------------------------------------------------------------------------------

def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise AdapterFormatError(f"{where}: {message}")


def _check_layers(saved: "_files.SavedAdapter", specs: List[LayerSpec], what: str) -> None:
    where = saved.config_path
    by_path = {spec.path: spec for spec in specs}
    missing = sorted(set(saved.layers) - set(by_path))
    extra = sorted(set(by_path) - set(saved.layers))
    _require(not missing and not extra, where,
             f"the adapter does not fit {what}: adapter layers absent from it {missing[:8]}, its targeted "
             f"layers absent from the adapter {extra[:8]}")
    for path, desc in saved.layers.items():
        spec = by_path[path]
        got = {"kind": spec.kind, "in_features": spec.in_features, "out_features": spec.out_features,
               "bias": spec.bias}
        want = {key: desc[key] for key in got}
        _require(got == want, where, f"layer {path!r} of {what} is {got}, the adapter was saved for {want}")
        _require(layout_fingerprint(spec.layout) == desc["layout"]["sha256"], where,
                 f"layer {path!r}: layout {spec.layout!r} differs from the saved one {desc['layout']}")


def _check_modules_to_save(saved: "_files.SavedAdapter", model: nn.Module, paths: List[str], what: str) -> None:
    where = saved.config_path
    _require(sorted(paths) == sorted(saved.modules_to_save), where,
             f"modules to save of {what} are {sorted(paths)}, the adapter has {sorted(saved.modules_to_save)}")
    for path in paths:
        state = model.get_submodule(path).state_dict()
        entries = saved.modules_to_save[path]
        _require(sorted(state) == sorted(entries), where,
                 f"module {path!r}: state keys {sorted(state)} != saved {sorted(entries)}")
        for key, value in state.items():
            entry = entries[key]
            saved_dtype = getattr(torch, entry["dtype"])
            _require(tuple(entry["shape"]) == tuple(value.shape), where,
                     f"module {path!r}: {key} has shape {tuple(value.shape)} here, {tuple(entry['shape'])} saved")
            _require(saved_dtype.is_floating_point == value.dtype.is_floating_point
                     and (saved_dtype == torch.bool) == (value.dtype == torch.bool), where,
                     f"module {path!r}: {key} is {value.dtype} here, {saved_dtype} saved")


@torch.no_grad()
def _copy_into(model: QGoftModel, saved: "_files.SavedAdapter") -> None:
    for path, layer in model.named_qgoft_layers():
        for name in saved.layers[path]["parameters"]:
            getattr(layer, name).copy_(saved.tensors[f"{path}.{name}"])
    for path in model.modules_to_save_paths:
        module = model.base_model.get_submodule(path)
        state = {key: saved.tensors[f"{path}.{key}"] for key in module.state_dict()}
        module.load_state_dict(state, strict=True)


def _set_trainable(model: QGoftModel, is_trainable: bool) -> None:
    for param in model.adapter_parameters():
        param.requires_grad_(is_trainable)
    for path in model.modules_to_save_paths:
        model.base_model.get_submodule(path).requires_grad_(is_trainable)
    if not is_trainable:
        model.eval()


def get_qgoft_model(model: nn.Module, config: QGoftConfig, adapter_name: str = DEFAULT_ADAPTER) -> QGoftModel:
    """Adapt ``model`` in place as ``config`` says and return the :class:`QGoftModel` wrapper.

    Every matching ``nn.Linear`` / transformers ``Conv1D`` becomes an identity-initialized ``qgoft.nn.Linear``
    (the outputs are unchanged until training); all parameters are frozen except the adapters and the
    ``modules_to_save``. Raises ValueError before changing anything when nothing matches. The adapter is
    named ``adapter_name``; :meth:`QGoftModel.add_adapter` adds more."""
    return QGoftModel(model, config, adapter_name)
