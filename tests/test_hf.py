"""Pipelines of tiny, randomly initialised Hugging Face ``transformers`` models (no downloads).

GPT-2 (tied input and output embeddings), Llama (rotary position embeddings passed to
every block as a tuple of tensors) and BERT (masked LM) are cut into 2 stages and
trained 5 steps under pp=2 (1F1B) and dp=2 x pp=2 (interleaved), and sharded under
dp=2,zero=3 (FSDP2); parameters gathered
with ``full_state_dict()`` must equal a single-process run's (max abs diff <= 1e-5 in
fp32; dropout off, so both runs compute the same function). SGD with momentum, for the
reason given in test_pp.py.
"""

from __future__ import annotations

import copy

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


def train(plan: str) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (8 * STEPS, 9), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    results = []
    for name, model in models().items():
        ref = copy.deepcopy(model)
        opt = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
        engine = mw.parallelize(model, plan, loss_fn=loss_fn, optimizer=opt, sample=(x[:8], y[:8]))
        losses = [engine.step(b) for b in engine.loader((x, y), 8, shuffle=False)]
        state = engine.full_state_dict()
        predicted = engine.predict(x[:3])["logits"]
        result = {"model": name, "losses": losses}
        if engine.is_main:
            ref_opt = opt(ref.parameters())
            ref_losses = []
            for i in range(STEPS):
                ref_opt.zero_grad()
                loss = loss_fn(ref(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8])
                loss.backward()
                ref_opt.step()
                ref_losses.append(loss.item())
            ref_state = ref.state_dict()
            ref.eval()
            with torch.no_grad():
                result["predict_diff"] = (predicted - ref(x[:3]).logits).abs().max().item()
            result["missing"] = sorted(set(ref_state) ^ set(state))
            result["diffs"] = {k: (state[k] - ref_state[k]).abs().max().item() for k in ref_state if k in state}
            result["loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses))
        results.append(result)
    return results


@pytest.mark.parametrize(("plan", "world"), [("pp=2", 2), ("dp=2,pp=2,schedule=interleaved", 4), ("dp=2,zero=3", 2), ("tp=2", 2)])
def test_hugging_face_models_in_a_pipeline_match_one_process(plan: str, world: int) -> None:
    results = harness.run(train, world, (plan,), deadline=300)
    for r in results[0]:
        assert not r["missing"], (r["model"], r["missing"])
        worst = max(r["diffs"], key=r["diffs"].get)
        assert r["diffs"][worst] <= TOL, (r["model"], worst, r["diffs"][worst])
        assert r["loss_diff"] <= TOL and r["predict_diff"] <= TOL, r["model"]
        assert all(r["losses"] == other["losses"] for ranks in results[1:] for other in ranks
                   if other["model"] == r["model"])


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
