"""Cut a model's forward into pipeline stages that run the model's own layers.

A model is traced with ``torch.fx`` into a graph whose *layers* (its children, and
the items of a ModuleList or Sequential child) stay opaque calls to the original
modules. The computation between layers (adding position embeddings, residuals in the
parent's forward, masks made from the input) is kept as graph nodes. A cut before
layer ``i`` puts every layer before it, and every node that needs only their results,
on the earlier side; the values the later side reads are sent forward as the stage's
outputs. Values that skip a stage are passed through it.

Nothing is re-implemented or re-traced inside a layer: a stage calls the very module
objects of the user's model, so its numbers are those of the single-process model,
shapes stay free (an uneven last batch runs), and parameter names are kept
(``blocks.3.attn.weight`` is called so on its stage). A weight shared by layers on
different stages (tied input and output embeddings) appears on each of them; the
engine keeps the copies equal by summing their gradients.

A cut is allowed only where every value crossing it is a tensor; models fx cannot
trace fall back to a checked chain of children (see ``partition.chain_layers``).
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx


@dataclass
class _Crossing:
    nodes: list[fx.Node]
    ok: bool
    why: str
    bytes: int


class GraphSplit:
    """A traced model and its layers, ready to cut into stage modules."""

    def __init__(self, model: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        self.model = model
        self.layers = _candidates(model)
        leaves = {module for _, module in self.layers}
        tracer = _LeafTracer(leaves, model)
        self.root = _root(model, len(inputs))
        config = getattr(model, "config", None)
        cache = getattr(config, "use_cache", None)
        if cache is True:  # a generation cache (Hugging Face models) has no place in training
            config.use_cache = False
        try:
            graph = tracer.trace(self.root)
        finally:
            if cache is True:
                config.use_cache = True
        self.opaque = tracer.opaque
        self.graph = graph
        self.gm = fx.GraphModule(self.root, graph)
        calls = [n for n in graph.nodes if n.op == "call_module"]
        names = [str(n.target) for n in calls]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{type(model).__name__} calls {', '.join(twice)} more than once in forward; a pipeline "
                             f"stage holds each layer once: give each use its own module (weights may be shared)")
        by_name = dict(self.layers)
        self.layers = [(name, by_name[name]) for name in names if name in by_name]
        self.index = {name: i for i, (name, _) in enumerate(self.layers)}
        self.values = _run(self.gm, inputs)  # node -> value on the sample
        self.layer_args = {str(n.target): self._args_of(n) for n in calls}
        self.crossings = [self._crossing(i) for i in range(len(self.layers) + 1)]

    def _args_of(self, node: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The layer's positional and keyword inputs on the sample."""
        value = lambda a: self.values[a] if isinstance(a, fx.Node) else a  # noqa: E731
        return tuple(fx.node.map_arg(node.args, value)), dict(fx.node.map_arg(node.kwargs, value))

    def layer_stage(self, bounds: list[tuple[int, int]]) -> list[int]:
        out = []
        for s, (a, b) in enumerate(bounds):
            out += [s] * (b - a)
        return out

    def _is_meta(self, node: fx.Node) -> bool:
        """A value computed from shapes (an int, a torch.Size), or the result of an opaque call:
        recomputed on each stage that reads it, from the tensors it came from, never sent."""
        if node.op in ("placeholder", "call_module", "output", "get_attr"):
            return False
        if node.op == "call_function" and node.target in self.opaque:
            return True  # an opaque call (a mask builder) can return None or a tensor by the data: rerun it
        value = self.values.get(node)
        return not _sendable(value) and not _bakeable(value)

    def _plan(self, stage_of_layer: list[int]) -> tuple[dict[fx.Node, int], list[list[fx.Node]], list[set[fx.Node]]]:
        """(stage of every node, values carried past each cut, shape values each stage recomputes).

        Layers go where the cut puts them; other nodes at the latest stage of their inputs
        (a node with no inputs, such as a constant or a weight, at its first user's stage)."""
        stage: dict[fx.Node, int] = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                stage[node] = stage_of_layer[self.index[str(node.target)]]
            elif node.op == "placeholder":
                stage[node] = 0
            elif node.op == "output":
                stage[node] = stage_of_layer[-1]
            else:
                ins = [stage[a] for a in node.all_input_nodes if a in stage]
                if ins:
                    stage[node] = max(ins)
        for node in reversed(self.graph.nodes):
            if node not in stage:
                users = [stage[u] for u in node.users if u in stage]
                stage[node] = min(users) if users else 0
        stages = max(stage_of_layer) + 1
        # what each stage reads: its nodes' inputs, looking through shape values to their sources
        reads: list[set[fx.Node]] = [set() for _ in range(stages)]
        metas: list[set[fx.Node]] = [set() for _ in range(stages)]
        for node in self.graph.nodes:
            if self._is_meta(node) or node.op == "get_attr":
                continue
            todo = list(node.all_input_nodes)
            while todo:
                a = todo.pop()
                if self._is_meta(a):
                    if a not in metas[stage[node]]:
                        metas[stage[node]].add(a)
                        todo += a.all_input_nodes
                elif a.op != "get_attr":
                    reads[stage[node]].add(a)
        carried = [[x for x in self.graph.nodes if x in set().union(*reads[s + 1:]) and stage[x] <= s
                    and not self._is_meta(x)] for s in range(stages - 1)]
        return stage, carried, metas

    def _crossing(self, cut: int) -> _Crossing:
        """What a cut before layer ``cut`` sends forward (cut 0 and cut L send nothing)."""
        n = len(self.layers)
        if cut in (0, n):
            return _Crossing([], True, "", 0)
        _, carried, _ = self._plan([0] * cut + [1] * (n - cut))
        sent = 0
        for x in carried[0]:
            value = self.values.get(x)
            if _sendable(value):
                sent += sum(t.numel() * t.element_size() for t in _flat(value))
            elif not _bakeable(value):
                return _Crossing(carried[0], False, f"value {x.name} is a Python {type(value).__name__}; only "
                                 f"tensors (or tuples of them, or constants such as None) pass between stages", 0)
        return _Crossing(carried[0], True, "", sent)

    def allowed_cuts(self) -> set[int]:
        return {i for i, c in enumerate(self.crossings) if c.ok}

    def stage_modules(self, bounds: list[tuple[int, int]]) -> list[torch.nn.Module]:
        """One module per stage: stage s takes stage s-1's outputs (the model's inputs for
        s = 0) and returns what later stages read (the model's output for the last)."""
        stage, carried, metas = self._plan(self.layer_stage(bounds))
        last = len(bounds) - 1
        modules = []
        for s in range(last + 1):
            graph = fx.Graph()
            env: dict[fx.Node, Any] = {}
            if s == 0:
                for x in self.graph.nodes:
                    if x.op == "placeholder":
                        env[x] = graph.placeholder(x.name)
            else:  # tensors arrive flat; a tuple of them is rebuilt, a constant baked in
                for x in carried[s - 1]:
                    value = self.values[x]
                    if not _sendable(value):
                        env[x] = value
                    elif isinstance(value, torch.Tensor):
                        env[x] = graph.placeholder(f"in_{x.name}")
                    else:
                        env[x] = type(value)(graph.placeholder(f"in_{x.name}_{i}") for i in range(len(value)))
            for x in self.graph.nodes:
                if x.op in ("placeholder", "output") or x in env:
                    continue
                if x.op == "get_attr":
                    if any(stage[u] == s or u in metas[s] for u in x.users):
                        env[x] = graph.node_copy(x, lambda a: env[a])
                elif x in metas[s] or (stage[x] == s and not self._is_meta(x)):
                    env[x] = graph.node_copy(x, lambda a: env[a])
            if s == last:
                out = next(x for x in self.graph.nodes if x.op == "output")
                graph.node_copy(out, lambda a: env[a])
            else:
                outs: list[Any] = []
                for x in carried[s]:
                    value = self.values[x]
                    if isinstance(value, torch.Tensor):
                        outs.append(env[x])
                    elif _sendable(value):
                        if isinstance(env[x], fx.Node):
                            outs += [graph.call_function(operator.getitem, (env[x], i)) for i in range(len(value))]
                        else:
                            outs += list(env[x])
                graph.output(outs[0] if len(outs) == 1 else tuple(outs))
            graph.lint()
            modules.append(fx.GraphModule(self.root, graph, class_name=f"Stage{s}"))
        return modules


def _sendable(value: Any) -> bool:
    """A tensor, or a tuple/list of tensors: what a stage can send."""
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def _flat(value: Any) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else list(value)


def _bakeable(value: Any) -> bool:
    """A value that does not depend on the batch, safe to fix at what the sample gave:
    None (e.g. an attention mask that is not needed), a device, a dtype, a flag, a name."""
    return value is None or isinstance(value, (torch.device, torch.dtype, bool, str))


class _LeafTracer(fx.Tracer):
    """Traces the model's forward through a positional-only root (see ``_root``), keeping
    its layers as calls to the modules.

    Hugging Face models build attention masks with functions that branch on tensor
    values (``transformers.masking_utils``); those run as opaque calls at run time,
    wherever the model's forwards find them."""

    def __init__(self, leaves: set[torch.nn.Module], model: torch.nn.Module) -> None:
        masks = sys.modules.get("transformers.masking_utils")
        opaque = tuple(v for k, v in vars(masks).items() if inspect.isfunction(v) and not k.startswith("_")
                       and v.__module__ == masks.__name__) if masks else ()
        super().__init__(autowrap_functions=opaque)
        self.opaque = set(opaque)
        self.leaves = leaves
        self.model = model
        self.constants = 0
        if opaque:
            homes = sorted({inspect.unwrap(type(m).forward).__module__ for m in model.modules()})
            self._autowrap_search = [*self._autowrap_search, *(sys.modules[h] for h in homes if h in sys.modules)]

    def create_arg(self, a: Any) -> Any:
        # a dataclass of plain values (a model config) is kept as it is; fx would rebuild it on
        # every call. One holding traced values (a model's output) is rebuilt, as fx does.
        if dataclasses.is_dataclass(a) and not isinstance(a, type) and not _holds_proxy(a):
            return self._constant(a)
        try:
            return super().create_arg(a)
        except NotImplementedError:  # a plain object (a config): kept by reference on the root
            return self._constant(a)

    def _constant(self, a: Any) -> Any:
        name = f"_meshwise_constant_{self.constants}"
        self.constants += 1
        self.root.__dict__[name] = a
        return self.create_node("get_attr", name, (), {})

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return m in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def path_of_module(self, mod: torch.nn.Module) -> str:
        return "" if mod is self.model else super().path_of_module(mod)


def _root(model: torch.nn.Module, arity: int) -> torch.nn.Module:
    """A module that calls ``model`` with ``arity`` positional inputs and shares its children,
    so names resolve as in ``model``. fx cannot trace a root ``forward`` with ``**kwargs`` or
    behind a decorator, as Hugging Face models have; it traces into them from here."""
    names = ", ".join(f"x{i}" for i in range(arity))
    scope: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self.__dict__['_meshwise_model']({names})\n", scope)
    root = torch.nn.Module()
    root.__dict__["_meshwise_model"] = model
    root._modules = model._modules  # the same children: "blocks.0" means the same module
    type_ = type("TracedRoot", (torch.nn.Module,), {"forward": scope["forward"]})
    root.__class__ = type_
    return root


def _holds_proxy(value: Any) -> bool:
    return any(isinstance(leaf, fx.Proxy) for leaf in torch.utils._pytree.tree_leaves(
        {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}))


def _candidates(model: torch.nn.Module, prefix: str = "") -> list[tuple[str, torch.nn.Module]]:
    """The splittable layers: children, with ModuleList/Sequential children opened one
    level, and a backbone child that holds a ModuleList of blocks (``transformer.h``,
    ``bert.encoder.layer``) opened into its own layers."""
    out = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) and len(child):
            out += [(f"{full}.{sub}", m) for sub, m in child.named_children()]
        elif _holds_blocks(child):
            out += _candidates(child, f"{full}.")
        else:
            out.append((full, child))
    return out


def _holds_blocks(module: torch.nn.Module) -> bool:
    """A child or grandchild is a ModuleList of two or more blocks."""
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) >= 2:
            return True
        if any(isinstance(g, torch.nn.ModuleList) and len(g) >= 2 for g in child.children()):
            return True
    return False


def _run(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> dict[fx.Node, Any]:
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            values[n] = result
            return result

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return values


class ChainSplit:
    """A model whose forward calls its layers one after the other (checked with hooks):
    stage s is the layers of its range applied in turn. For models fx cannot trace."""

    def __init__(self, model: torch.nn.Module, layers: list[tuple[str, torch.nn.Module]], inputs: Any) -> None:
        self.model = model
        self.layers = layers
        self.layer_args: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        x = inputs
        with torch.no_grad():
            for name, module in layers:
                self.layer_args[name] = ((x,), {})
                x = module(x)
        outs = [self.layer_args[name][0][0] for name, _ in layers[1:]] + [x]
        self.crossings = [_Crossing([], True, "", 0)] + [
            _Crossing([], isinstance(o, torch.Tensor), f"{name} returns a Python {type(o).__name__}; only tensors pass between stages",
                      o.numel() * o.element_size() if isinstance(o, torch.Tensor) else 0)
            for (name, _), o in zip(layers, outs)
        ]
        self.crossings[-1] = _Crossing([], True, "", 0)

    def allowed_cuts(self) -> set[int]:
        return {i for i, c in enumerate(self.crossings) if c.ok}

    def stage_modules(self, bounds: list[tuple[int, int]]) -> list[torch.nn.Module]:
        return [_Chain(self.layers[a:b]) for a, b in bounds]


class _Chain(torch.nn.Module):
    """Layers applied in turn, registered under their names in the original model."""

    def __init__(self, layers: list[tuple[str, torch.nn.Module]]) -> None:
        super().__init__()
        self.order: list[str] = []
        for name, module in layers:
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, module)
            self.order.append(name)

    def forward(self, x: Any) -> Any:
        for name in self.order:
            x = self.get_submodule(name)(x)
        return x
