"""Tensor parallelism: one layer's matrices split across the ``tp`` ranks of a replica.

``tensor_plan(model, tp)`` decides, module by module, with DTensor's styles
(``ColwiseParallel``, ``RowwiseParallel``), and says why:

* **attention**: a module whose children include query, key, value and output
  projections (``q/k/v`` + ``proj``/``o``, ``q_proj/k_proj/v_proj/o_proj``,
  ``query/key/value`` + ``out_proj``/``dense``...): q, k, v column-parallel (by heads),
  the output row-parallel, when ``tp`` divides the heads (and key/value heads). The
  module must count heads from its projections' output (``view(b, t, -1, head_dim)``),
  as Llama's and meshwise's GPT do.
* **MLP pairs**: in a ``Sequential``, a Linear, element-wise layers, then a Linear;
  in other modules, Linears named as up projections (``fc1``, ``up_proj``,
  ``gate_proj``, ``w1``, ``w3``...) with a down projection (``fc2``, ``down_proj``,
  ``w2``...): column-parallel then row-parallel, when ``tp`` divides the hidden width.
* everything else stays **replicated**: norms, embeddings and the output head
  (vocabulary-parallel embeddings are not implemented), layers no rule covers, and
  layers ``tp`` does not divide. Replicated is never wrong; it only saves nothing.

A user may override any module by name: ``overrides={"blocks.0.mlp.0": "replicate"}``.
The split parts compute exactly what the whole layers compute; the row-parallel
output is all-reduced within the replica.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from meshwise import data, memory
from meshwise import dist as mwdist
from meshwise.engine import Engine, LossFn, OptimizerArg
from meshwise.plan import Plan

ELEMENTWISE = (torch.nn.GELU, torch.nn.ReLU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.Dropout, torch.nn.Identity,
               torch.nn.Sigmoid, torch.nn.LeakyReLU, torch.nn.Mish)
QUERY, KEY, VALUE = ("q", "q_proj", "query", "wq"), ("k", "k_proj", "key", "wk"), ("v", "v_proj", "value", "wv")
OUTPUT = ("proj", "o", "o_proj", "out_proj", "dense", "wo", "c_proj")
UP = ("fc1", "up_proj", "gate_proj", "w1", "w3", "fc_in", "c_fc", "linear1")
DOWN = ("fc2", "down_proj", "w2", "fc_out", "linear2")
HEADS = ("heads", "num_heads", "n_heads", "n_head", "num_attention_heads")
KV_HEADS = ("num_key_value_heads", "n_kv_heads", "kv_heads")
STYLES = ("colwise", "rowwise", "replicate")


@dataclass(frozen=True)
class Decision:
    name: str
    kind: str
    style: str
    why: str


@dataclass(frozen=True)
class TensorPlan:
    """What ``tp`` ranks split and what they replicate, module by module, and why."""

    tp: int
    decisions: tuple[Decision, ...]

    @property
    def sharded(self) -> dict[str, str]:
        return {d.name: d.style for d in self.decisions if d.style != "replicate"}

    def __str__(self) -> str:
        rows = [f"tensor plan for tp={self.tp}: {len(self.sharded)} of {len(self.decisions)} modules split"]
        rows += [f"  {d.name:<28} {d.kind:<12} {d.style:<9} {d.why}" for d in self.decisions]
        return "\n".join(rows)

    def styles(self) -> dict[str, Any]:
        """The plan as torch's ``parallelize_module`` takes it."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        return {name: ColwiseParallel() if style == "colwise" else RowwiseParallel()
                for name, style in self.sharded.items()}


def tensor_plan(model: torch.nn.Module, tp: int, overrides: dict[str, str] | None = None) -> TensorPlan:
    """Decide how ``tp`` ranks split ``model``'s layers (see the module docstring)."""
    if type(tp) is not int or tp < 1:
        raise ValueError(f"tp={tp!r} is invalid: it must be an integer >= 1")
    decided: dict[str, Decision] = {}
    config = getattr(model, "config", None)
    for name, module in model.named_modules():
        children = dict(module.named_children())
        linears = {k: m for k, m in children.items() if isinstance(m, torch.nn.Linear)}
        _attention(name, module, linears, tp, config, decided)
        _named_mlp(name, linears, tp, decided)
        if isinstance(module, torch.nn.Sequential):
            _sequential_mlp(name, list(children.items()), tp, decided)
    for name, module in model.named_modules():
        if name and not list(module.children()) and name not in decided and any(True for _ in module.parameters()):
            kind = type(module).__name__
            if isinstance(module, torch.nn.Embedding):
                why = "vocabulary-parallel embeddings are not implemented"
            elif isinstance(module, torch.nn.Linear):
                why = "a Linear no rule pairs up"
            elif "norm" in kind.lower():
                why = "a norm: cheap, kept whole"
            else:
                why = f"no rule for {kind}"
            decided[name] = Decision(name, kind, "replicate", why)
    for name, style in (overrides or {}).items():
        if style not in STYLES:
            raise ValueError(f"override {name}={style!r} is invalid: use one of {', '.join(STYLES)}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"override names {name!r}, which is not a module of {type(model).__name__}") from None
        if style != "replicate" and not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            raise ValueError(f"override {name}={style}: only Linear and Embedding layers can be split, "
                             f"{name} is a {type(module).__name__}")
        decided[name] = Decision(name, type(module).__name__, style, "set by the user")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return TensorPlan(tp, tuple(sorted(decided.values(), key=lambda d: order[d.name])))


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _pick(linears: dict[str, torch.nn.Linear], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in linears), None)


def _attention(name: str, module: torch.nn.Module, linears: dict[str, torch.nn.Linear], tp: int, config: Any,
               decided: dict[str, Decision]) -> None:
    q, k, v, o = (_pick(linears, names) for names in (QUERY, KEY, VALUE, OUTPUT))
    if not (q and k and v and o):
        return
    heads = next((getattr(module, a) for a in HEADS if isinstance(getattr(module, a, None), int)), None)
    heads = heads or next((getattr(config, a) for a in HEADS if isinstance(getattr(config, a, None), int)), None)
    kv = next((getattr(module, a) for a in KV_HEADS if isinstance(getattr(module, a, None), int)), None)
    kv = kv or next((getattr(config, a) for a in KV_HEADS if isinstance(getattr(config, a, None), int)), None) or heads
    parts = [_join(name, x) for x in (q, k, v, o)]
    if heads is None:
        why = "attention whose head count is not found (no heads/num_heads attribute): kept whole"
        style = None
    elif heads % tp or kv % tp:
        why = f"attention with {heads} heads ({kv} key/value): tp={tp} does not divide them"
        style = None
    else:
        why = f"attention, {heads // tp} of {heads} heads per rank"
        style = "split"
    for part, role in zip(parts, ("q", "k", "v", "out")):
        decided[part] = Decision(part, f"attn {role}", ("rowwise" if role == "out" else "colwise")
                                 if style else "replicate", why)


def _pair(first: str, second: str, a: torch.nn.Linear, b: torch.nn.Linear, tp: int,
          decided: dict[str, Decision], kind: str) -> None:
    if first in decided or second in decided:
        return
    width = a.out_features
    if b.in_features != width:
        return
    if width % tp:
        why = f"{kind}: tp={tp} does not divide its width {width}"
        decided[first] = Decision(first, "mlp in", "replicate", why)
        decided[second] = Decision(second, "mlp out", "replicate", why)
        return
    why = f"{kind}, {width // tp} of {width} hidden units per rank"
    decided[first] = Decision(first, "mlp in", "colwise", why)
    decided[second] = Decision(second, "mlp out", "rowwise", why)


def _sequential_mlp(name: str, items: list[tuple[str, torch.nn.Module]], tp: int,
                    decided: dict[str, Decision]) -> None:
    i = 0
    while i < len(items):
        if isinstance(items[i][1], torch.nn.Linear):
            j = i + 1
            while j < len(items) and isinstance(items[j][1], ELEMENTWISE):
                j += 1
            if j < len(items) and j > i + 1 and isinstance(items[j][1], torch.nn.Linear):
                _pair(_join(name, items[i][0]), _join(name, items[j][0]), items[i][1], items[j][1], tp, decided,
                      "MLP")
                i = j + 1
                continue
        i += 1


def _named_mlp(name: str, linears: dict[str, torch.nn.Linear], tp: int, decided: dict[str, Decision]) -> None:
    ups = [n for n in UP if n in linears]
    down = _pick(linears, DOWN)
    if not ups or not down:
        return
    if any(linears[u].out_features != linears[down].in_features for u in ups):
        return
    for up in ups[1:]:  # gated MLPs (gate_proj, up_proj): every up projection column-parallel
        decided[_join(name, up)] = Decision(_join(name, up), "mlp in", "colwise", "gated MLP")
    _pair(_join(name, ups[0]), _join(name, down), linears[ups[0]], linears[down], tp, decided, "MLP")
    first = decided[_join(name, ups[0])]
    if first.style == "replicate":
        for up in ups[1:]:
            decided[_join(name, up)] = Decision(_join(name, up), "mlp in", "replicate", first.why)


def split_tensors(model: torch.nn.Module, mesh: Any, plan: Plan, *, within: list[torch.nn.Module] | None = None,
                  announce: bool = False) -> TensorPlan:
    """Apply ``tensor_plan(model, plan.tp)`` in place on the 1-D ``mesh`` (the tp axis) with
    DTensor's styles; ``within``: only layers inside these modules (a pipeline rank's stages)."""
    from torch.distributed.tensor.parallel import parallelize_module

    decided = tensor_plan(model, plan.tp)
    if announce:
        print(f"meshwise: plan {plan}: {decided}", flush=True)
    styles = decided.styles()
    if within is not None:
        local = {id(m) for module in within for m in module.modules()}
        styles = {name: style for name, style in styles.items() if id(model.get_submodule(name)) in local}
    if styles:
        parallelize_module(model, mesh, styles)
    elif not decided.sharded and announce:
        warnings.warn(f"tp={plan.tp}: no layer of {type(model).__name__} can be split (see the tensor plan above), "
                      f"so the tp ranks repeat the same work; use dp={plan.dp * plan.tp} instead", stacklevel=3)
    return decided


class TensorEngine(Engine):
    """Data x tensor parallelism on a 2-D (dp, tp) mesh: rank = dp_index * tp + tp_index.

    The tp ranks of a replica see the same rows; DTensor's styles split the planned
    layers among them. Micro-batch k of replica r is back-propagated with weight m_k / N
    and, after the last one, every gradient (a shard's, or a replicated layer's) is
    summed over the replicas in one flat all-reduce, as in a pipeline.
    """

    def __init__(self, model: torch.nn.Module, plan: Plan, ctx: mwdist.Context, *, loss_fn: LossFn | None,
                 optimizer: OptimizerArg | None, sample: Any) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self._init_common(model, plan, ctx, loss_fn, sample)
        mesh = init_device_mesh(self.device.type, (plan.dp, plan.tp), mesh_dim_names=("dp", "tp"))
        self.dp_group, self.tp_group = mesh.get_group("dp"), mesh.get_group("tp")
        self.dp_rank, self.dp_size = mesh.get_local_rank("dp"), plan.dp
        model.to(self.device)
        memory.broadcast_state(model, self.device)
        self.tensor_plan = split_tensors(model, mesh["tp"], plan, announce=self.is_main)
        self._model = model
        from meshwise.zero import optimizer_on, shard_optimizer

        self.optimizer = optimizer_on(optimizer, model, f"tp={plan.tp}")
        if plan.zero == 1 and self.optimizer is not None:  # optimizer state sharded over the replicas
            self.optimizer = shard_optimizer(self.optimizer, model, self.dp_group)
        self._params = [p for p in model.parameters() if p.requires_grad]

    @property
    def model(self) -> torch.nn.Module:
        """The user's model, split in place (planned layers hold DTensor shards)."""
        return self._model

    def step(self, batch: Any) -> float:
        """Forward and backward on this replica's share (split layers communicate within the
        replica), gradients summed over replicas, optimizer step. Returns the global mean loss."""
        local, total = self._begin_step(batch)
        if self.device.type != "cpu":
            batch = data.to_device(batch, self.device)
        parts = self._parts(batch, local)
        loss_sum = torch.zeros((), device=self.device)
        for part, size in parts:
            inputs, targets = data.unpack(part)
            with memory.autocast(self.device, self.plan.precision):
                loss = self._loss(data.call(self._model, inputs), targets)
            (loss if size == total else loss * (size / total)).backward()
            loss_sum += loss.detach().float() * size
        reduced = dist.all_reduce(loss_sum, group=self.dp_group, async_op=True) if self.dp_size > 1 else None
        if self.dp_size > 1:
            mwdist.sum_gradients(self._params, self.dp_group, self.device)
        self._grad_bytes = memory.grad_bytes(self._model)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if reduced is not None:
            reduced.wait()
        self.steps += 1
        return float(loss_sum) / total

    def _forward_inputs(self, dataset: Any, indices: torch.Tensor) -> Any:
        out = super()._forward_inputs(dataset, indices)
        return data.map_tensors(lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t + 0, out)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0 (split layers gathered), None elsewhere. A collective."""
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
                 for k, v in self._model.state_dict().items()}
        return state if self.is_main else None
