"""Oracles: TRL's DPO, CPO and ORPO losses against ours on the same inputs. Moved out of
test_losses.py unchanged.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from alphadpo_cli.losses import PreferenceLogps, compute_loss
from test_losses import F64, close


# ==========================================================================================
# Oracle: TRL 1.16's sigmoid DPO loss, through its public DPOTrainer.compute_loss
# ==========================================================================================


def test_dpo_matches_trl_sigmoid_loss(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    words = ["<pad>", "<eos>", "<unk>"] + list("abcdefghijklmnop")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    reference = LlamaForCausalLM(cfg)
    data = Dataset.from_dict(
        {
            "prompt": ["a b c", "d e", "f g h i"],
            "chosen": [" j k", " l m n o", " p"],
            "rejected": [" k k k", " a", " b c"],
        }
    )
    beta = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(
            output_dir=str(tmp_path), beta=beta, loss_type=["sigmoid"], per_device_train_batch_size=3, report_to=[],
            use_cpu=True, bf16=False, max_length=None, disable_tqdm=True,
        )  # fmt: skip
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
        inputs = next(iter(trainer.get_train_dataloader()))  # rows: [chosen x3; rejected x3]
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, inputs).item()

    # Our side: summed completion log-probs from a plain forward of the same models.
    def summed_logps(model):
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        lp = logits[:, :-1].log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
        mask = inputs["completion_mask"][:, 1:]
        return (lp * mask).sum(1).double(), mask.sum(1).double()

    pol, lengths = summed_logps(trainer.model)
    ref, _ = summed_logps(reference)
    inp = PreferenceLogps(pol[:3], pol[3:], lengths[:3], lengths[3:], ref[:3], ref[3:])
    ours = compute_loss("dpo", inp, {"beta": beta}).losses.mean().item()
    assert abs(ours - math.log(2)) > 1e-3  # policy != reference, so the check is not trivial
    assert math.isclose(ours, trl_loss, rel_tol=1e-5, abs_tol=1e-6)


# ==========================================================================================
# Oracle: TRL 1.16's CPO and ORPO losses on tensors, with the NLL TRL takes over the chosen tokens
# ==========================================================================================


def _trl_logits_batch(seed=0):
    """Random logits for B = 3 pairs with unequal prompt and response lengths, TRL-style labels."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = 3, 12, 11
    logits = torch.randn(2 * B, T, V, generator=g, dtype=F64) * 2
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    prompt = [3, 5, 2, 3, 5, 2]
    length = [4, 6, 2, 5, 3, 7]  # response tokens: chosen rows 0..2, rejected rows 3..5
    labels = torch.full((2 * B, T), -100)
    for i in range(2 * B):
        labels[i, prompt[i]: prompt[i] + length[i]] = ids[i, prompt[i]: prompt[i] + length[i]]
    return logits, labels, B


def _ours_from_logits(logits, labels, B):
    tgt = labels[:, 1:]
    mask = tgt != -100
    lp = logits[:, :-1].log_softmax(-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums, counts = (lp * mask).sum(1), mask.sum(1).to(F64)
    return PreferenceLogps(sums[:B], sums[B:], counts[:B], counts[B:])


def _trl_nll(logits, labels, B):
    # TRL's CPO/ORPO concatenated_forward: nn.CrossEntropyLoss over the shifted chosen rows
    return torch.nn.functional.cross_entropy(
        logits[:B, :-1].reshape(-1, logits.shape[-1]), labels[:B, 1:].reshape(-1), ignore_index=-100
    )


def test_cpo_matches_trl():
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer

    logits, labels, B = _trl_logits_batch()
    beta, w = 0.3, 1.0
    trl_self = SimpleNamespace(alpha=0.0, beta=beta, loss_type="sigmoid", label_smoothing=0.0,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
    logps = CPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=False)
    trl_losses, trl_c, _ = CPOTrainer.cpo_loss(trl_self, logps[:B], logps[B:])
    trl_loss = trl_losses.mean() + w * _trl_nll(logits, labels, B)

    ours = compute_loss("cpo", _ours_from_logits(logits, labels, B), {"beta": beta, "nll_weight": w})
    assert math.isclose(ours.loss.item(), trl_loss.item(), rel_tol=1e-10)
    close(ours.chosen_rewards, trl_c.tolist())
    seq = compute_loss("cpo", _ours_from_logits(logits, labels, B), {"beta": beta, "nll_reduction": "sequence"})
    assert abs(seq.loss.item() - trl_loss.item()) > 1e-3  # unequal lengths: the mean of means differs


def test_orpo_matches_trl():
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    logits, labels, B = _trl_logits_batch(seed=1)
    lam = 0.5
    trl_self = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    avg = ORPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=True)
    trl_losses, trl_c, _, _, _ = ORPOTrainer.odds_ratio_loss(trl_self, avg[:B], avg[B:])
    trl_loss = _trl_nll(logits, labels, B) - trl_losses.mean()  # ORPOTrainer: loss = nll − mean(λ·logσ(·))

    ours = compute_loss("orpo", _ours_from_logits(logits, labels, B), {"lam": lam})
    assert math.isclose(ours.loss.item(), trl_loss.item(), rel_tol=1e-6)
    close(ours.chosen_rewards, trl_c.tolist(), tol=1e-6)
