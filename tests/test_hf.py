"""Tiny, randomly initialised Hugging Face ``transformers`` models (no downloads) under every
kind of plan.

GPT-2 (tied input and output embeddings), Llama (rotary position embeddings passed to
every block as a tuple of tensors; attention and gated MLP split by tensor parallelism)
and BERT (masked LM) train 5 steps under pipelines, tensor parallelism, ZeRO and their
combinations, up to dp=2 x pp=2 x tp=2 on 8 processes. Parameters gathered with
``full_state_dict()`` must equal a single-process run's (max abs diff <= 1e-5 in fp32;
dropout off, so both runs compute the same function), and load into a fresh model whose
outputs equal ``engine.predict``'s. SGD with momentum, for the reason given in test_pp.py.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import harness
import meshwise as mw

transformers = pytest.importorskip("transformers")

TOL = 1e-5
STEPS = 5
VOCAB = 48


def models() -> dict[str, torch.nn.Module]:
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    quiet = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=4, n_head=2,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **quiet)),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=16, **quiet)),
        "bert": BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                           attention_probs_dropout_prob=0.0, **quiet)),
    }


def loss_fn(out, y):
    logits = out["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


PLANS = {
    2: ["pp=2", "dp=2,zero=3", "tp=2"],
    4: ["pp=2,tp=2", "dp=2,pp=2,zero=2"],
    # dp=2,pp=2,tp=2 at world 8 passed for all three models; it is left out for the suite's time
    # (30 s, mostly setting up 8 processes), and tests/test_mesh.py runs that mesh at world 8
}


def train(plans: list[str]) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (8 * STEPS, 9), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    references = {}
    for name, ref in models().items():
        ref_opt = opt(ref.parameters())
        ref_losses = []
        for i in range(STEPS):
            ref_opt.zero_grad()
            loss = loss_fn(ref(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8])
            loss.backward()
            ref_opt.step()
            ref_losses.append(loss.item())
        with torch.no_grad():
            references[name] = (ref.state_dict(), ref_losses, ref.eval()(x[:3]).logits)
    results = []
    for plan in plans:
        for name, model in models().items():
            engine = mw.parallelize(model, plan, loss_fn=loss_fn, optimizer=opt, sample=(x[:8], y[:8]))
            losses = [engine.step(b) for b in engine.loader((x, y), 8, shuffle=False)]
            state = engine.full_state_dict()
            predicted = engine.predict(x[:3])["logits"].cpu()
            result = {"plan": plan, "model": name, "losses": losses,
                      "split": len(engine.tensor_plan.sharded) if hasattr(engine, "tensor_plan") else 0}
            if engine.is_main:
                ref_state, ref_losses, ref_out = references[name]
                result["predict_diff"] = (predicted - ref_out).abs().max().item()
                result["missing"] = sorted(set(ref_state) ^ set(state))
                result["diffs"] = {k: (state[k] - ref_state[k]).abs().max().item() for k in ref_state if k in state}
                result["loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
                plain = type(model.module if hasattr(model, "module") else model)(model.config)
                plain.load_state_dict(state, strict=True)
                with torch.no_grad():
                    result["round_trip"] = (plain.eval()(x[:3]).logits - predicted).abs().max().item()
            results.append(result)
    return results


@pytest.mark.parametrize("world", sorted(PLANS))
def test_hugging_face_models_under_every_kind_of_plan_match_one_process(world: int) -> None:
    results = harness.run(train, world, (PLANS[world],), deadline=120 + 60 * len(PLANS[world]))
    for r in results[0]:
        where = (r["plan"], r["model"])
        assert not r["missing"], (where, r["missing"])
        worst = max(r["diffs"], key=r["diffs"].get)
        assert r["diffs"][worst] <= TOL, (where, worst, r["diffs"][worst])
        assert r["loss_diff"] <= TOL and r["predict_diff"] <= TOL and r["round_trip"] <= TOL, (where, r)
        if "tp=2" in r["plan"]:  # llama: 4 layers x (q, k, v, o, gate, up, down), embedding, head; gpt2: its
            # tied embedding and head (Conv1D layers have no rule); bert: none (its tied head's bias is shared too)
            assert r["split"] == {"llama": 30, "gpt2": 2, "bert": 0}[r["model"]], (where, r["split"])
        assert all(r["losses"] == other["losses"] for ranks in results[1:] for other in ranks
                   if (other["plan"], other["model"]) == where)


def test_a_mask_built_from_the_data_is_rebuilt_on_every_stage() -> None:
    """Traced on an unpadded sample, where the mask builder returns None, the stages must still
    honour a padded batch's attention mask: the builder runs again on each stage."""
    model = models()["llama"].eval()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    part = mw.partition(model, ((ids, torch.ones_like(ids)), None), stages=3)
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    for mask in (torch.ones_like(ids), padded):
        h = (ids, mask)
        for stage in part.stage_modules():
            h = stage(*h)
            h = h if isinstance(h, tuple) else (h,)
        with torch.no_grad():
            assert (h[0]["logits"] - model(ids, mask).logits).abs().max() < 1e-5
