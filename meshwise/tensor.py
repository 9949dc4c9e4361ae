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
* **vocabulary**: the token embedding (the model's largest ``nn.Embedding``) row-parallel,
  each rank holding 1/tp of the vocabulary's rows (ids outside a rank's rows give zeros;
  the partial outputs are all-reduced), and an output head (a Linear from the embedding
  width to the vocabulary) column-parallel with its logits gathered, so the loss sees
  them whole. A head tied to the embedding (GPT-2's, BERT's) stays one weight: both
  split it by vocabulary rows, the same way.
* everything else stays **replicated**: norms, small embeddings (positions, token
  types), embeddings with a ``padding_idx``, layers no rule covers, and layers ``tp``
  does not divide. Replicated is never wrong; it only saves nothing.

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
from meshwise.observe import note
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
    group: str = ""
    """Modules split together (an attention's projections, an MLP pair): all or none. '' alone."""


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
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        out = {}
        for d in self.decisions:
            if d.style == "colwise":  # a vocabulary head's logits are gathered for the loss
                out[d.name] = ColwiseParallel(output_layouts=Replicate()) if d.kind == "vocab head" else ColwiseParallel()
            elif d.style == "rowwise":  # an embedding takes whole (replicated) ids
                out[d.name] = RowwiseParallel(input_layouts=Replicate()) if d.kind in ("vocab embed", "Embedding") \
                    else RowwiseParallel()
        return out


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
    _vocabulary(model, tp, decided)
    for name, module in model.named_modules():
        if name and not list(module.children()) and name not in decided and any(True for _ in module.parameters()):
            kind = type(module).__name__
            if isinstance(module, torch.nn.Embedding):
                why = f"a small embedding ({module.num_embeddings} rows): kept whole"
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
    _keep_ties(model, decided)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return TensorPlan(tp, tuple(sorted(decided.values(), key=lambda d: order[d.name])))


def _vocabulary(model: torch.nn.Module, tp: int, decided: dict[str, Decision]) -> None:
    """The token embedding row-parallel and output heads onto its vocabulary column-parallel."""
    embeddings = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Embedding}
    if not embeddings:
        return
    name, emb = max(embeddings.items(), key=lambda item: item[1].num_embeddings)
    vocab, width = emb.num_embeddings, emb.embedding_dim
    heads = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in decided
             and m.out_features == vocab and m.in_features == width]
    if emb.padding_idx is not None or emb.max_norm is not None or emb.sparse:
        why = "the token embedding has padding_idx, max_norm or sparse gradients, which a vocabulary split changes"
        style = None
    elif vocab % tp:
        why = f"vocabulary: tp={tp} does not divide its {vocab} rows"
        style = None
    else:
        why = f"vocabulary, {vocab // tp} of {vocab} rows per rank"
        style = "split"
    decided[name] = Decision(name, "vocab embed", "rowwise" if style else "replicate", why)
    for head in heads:
        decided[head] = Decision(head, "vocab head", "colwise" if style else "replicate",
                                 why + ("; logits gathered" if style else ""))


def _keep_ties(model: torch.nn.Module, decided: dict[str, Decision]) -> None:
    """A weight shared by modules (tied embeddings) is split only if every module that holds it
    splits it the same way (by rows of the weight: row-parallel embedding, column-parallel
    Linear); otherwise all of them keep it whole."""
    rows = {("vocab embed", "rowwise"), ("Embedding", "rowwise"), ("vocab head", "colwise"),
            ("mlp in", "colwise"), ("attn q", "colwise"), ("attn k", "colwise"), ("attn v", "colwise"),
            ("Linear", "colwise")}
    holders: dict[int, list[str]] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(full.rpartition(".")[0])
    changed = True
    while changed:  # keeping one holder whole can make another tie mixed: until nothing changes
        changed = False
        for names in holders.values():
            if len(names) < 2:
                continue
            ways = {(decided[n].kind, decided[n].style) if n in decided else ("", "replicate") for n in names}
            if all(way in rows for way in ways) or all(style == "replicate" for _, style in ways):
                continue
            for n in names:
                if n in decided and decided[n].style != "replicate":
                    others = " and ".join(sorted({m or "the model" for m in names if m != n}))
                    decided[n] = Decision(n, decided[n].kind, "replicate",
                                          f"shares a weight with {others}, which cannot split it the same way: "
                                          f"kept whole")
                    changed = True


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
                                 if style else "replicate", why, name)


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
    decided[first] = Decision(first, "mlp in", "colwise", why, first)
    decided[second] = Decision(second, "mlp out", "rowwise", why, first)


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
        decided[_join(name, up)] = Decision(_join(name, up), "mlp in", "colwise", "gated MLP", _join(name, ups[0]))
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
        note(f"meshwise: plan {plan}: {decided}")
    styles = decided.styles()
    local = {id(m) for module in within for m in module.modules()} if within is not None else None
    if local is not None:  # a group (column- then row-parallel) is split only if this rank runs all of it
        inside = {d.name: id(model.get_submodule(d.name)) in local for d in decided.decisions}
        apart = {d.group for d in decided.decisions if d.group and not inside[d.name]}
        styles = {d.name: styles[d.name] for d in decided.decisions
                  if d.name in styles and inside[d.name] and d.group not in apart}
    if styles:
        tied = _tied_groups(model, local)
        parallelize_module(model, mesh, styles)
        _retie(model, tied)
    elif not decided.sharded and announce:
        warnings.warn(f"tp={plan.tp}: no layer of {type(model).__name__} can be split (see the tensor plan above), "
                      f"so the tp ranks repeat the same work; use dp={plan.dp * plan.tp} instead", stacklevel=3)
    return decided


def _tied_groups(model: torch.nn.Module, local: set[int] | None) -> list[list[tuple[str, str]]]:
    """(module name, parameter name) of every weight held by more than one module (of those
    whose ids are in ``local``: a pipeline rank's own; the others keep theirs)."""
    holders: dict[int, list[tuple[str, str]]] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        module, _, attr = full.rpartition(".")
        if local is None or id(model.get_submodule(module)) in local:
            holders.setdefault(id(p), []).append((module, attr))
    return [names for names in holders.values() if len(names) > 1]


def _retie(model: torch.nn.Module, tied: list[list[tuple[str, str]]]) -> None:
    """``parallelize_module`` gives each module its own new parameter: tied modules get one
    again (the plan splits a tied weight the same way in all of them, see ``_keep_ties``)."""
    for names in tied:
        first = getattr(model.get_submodule(names[0][0]), names[0][1])
        for module, attr in names[1:]:
            other = getattr(model.get_submodule(module), attr)
            if other is first:
                continue
            if getattr(other, "placements", None) != getattr(first, "placements", None):
                raise ValueError(f"{names[0][0]}.{names[0][1]} and {module}.{attr} are one tied weight, split in "
                                 f"two different ways; override both to 'replicate' or split them alike")
            setattr(model.get_submodule(module), attr, first)


class TensorEngine(Engine):
    """Data x tensor parallelism on a 2-D (dp, tp) mesh: rank = dp_index * tp + tp_index.

    The tp ranks of a replica see the same rows; DTensor's styles split the planned
    layers among them. Micro-batch k of replica r is back-propagated with weight m_k / N
    and, after the last one, every gradient (a shard's, or a replicated layer's) is
    summed over the replicas in one flat all-reduce, as in a pipeline.
    """

    _collectives = "the tensor-parallel all-reduces or the gradient all-reduce"

    def __init__(self, model: torch.nn.Module, plan: Plan, ctx: mwdist.Context, *, loss_fn: LossFn | None,
                 optimizer: OptimizerArg | None, sample: Any) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self._init_common(model, plan, ctx, loss_fn, sample)
        mesh = init_device_mesh(self.device.type, (plan.dp, plan.tp), mesh_dim_names=("dp", "tp"))
        self.dp_group, self.tp_group = mesh.get_group("dp"), mesh.get_group("tp")
        self.dp_rank, self.dp_size = mesh.get_local_rank("dp"), plan.dp
        self.tp_rank = mesh.get_local_rank("tp")
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
        else:
            mwdist.match_layouts(self._params)
        self._grad_bytes = memory.grad_bytes(self._model)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if reduced is not None:
            reduced.wait()
        self.steps += 1
        self._after_update()
        return float(loss_sum) / total

    def _forward_inputs(self, dataset: Any, indices: torch.Tensor) -> Any:
        out = super()._forward_inputs(dataset, indices)
        return data.map_tensors(lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t + 0, out)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0 (split layers gathered), None elsewhere. A collective."""
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
                 for k, v in self._model.state_dict().items()}
        return state if self.is_main else None
