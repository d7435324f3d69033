"""The training step's speed-ups keep its numerics: the output head and the loss only where a
target is (SFT's response-only loss), and the fused AdamW."""

import torch

from cm3leon.model.config import ModelConfig
from cm3leon.model.transformer import CM3LeonTransformer, loss_positions
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.train.config import TrainConfig
from cm3leon.train.loop import build_optimizer, train_step
from cm3leon.train.parallel import DistInfo

VOCAB = Vocab(text_vocab_size=40, image_vocab_size=24, num_sentinels=4)


def _model() -> CM3LeonTransformer:
    torch.manual_seed(0)
    m = CM3LeonTransformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB.size))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    return m


def _batch(seed: int = 0, ignored: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB.size, (3, 33), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[torch.rand(y.shape, generator=g) < ignored] = -100  # response-only: most positions take no loss
    return x, y


def test_loss_only_where_targets_are_is_the_same_loss_and_gradient():
    x, y = _batch()
    idx = loss_positions(y)
    for reduction in ("mean", "none"):
        m1, m2 = _model(), _model()
        _, full = m1(x, y, reduction=reduction)
        logits, part = m2(x, y, reduction=reduction, loss_index=idx)
        assert logits.shape == (idx.numel(), VOCAB.size)
        torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-6)
        full.sum().backward()
        part.sum().backward()
        for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_train_steps_match_the_whole_head_and_foreach_adamw():
    """Three steps of the trainer (head where the targets are, fused AdamW) against the
    reference (whole head, multi-tensor AdamW): the same losses within float rounding."""
    cfg = TrainConfig(seq_len=32, micro_batch_size=3, lr=1e-3)
    info = DistInfo(device=torch.device("cpu"))
    fast, ref = _model(), _model()
    opt_fast = build_optimizer(fast, cfg)
    assert opt_fast.defaults.get("fused")
    opt_ref = torch.optim.AdamW([{"params": [p for p in ref.parameters() if p.dim() >= 2],
                                  "weight_decay": cfg.weight_decay}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                foreach=True)

    class Whole(torch.nn.Module):  # the same model without partial_head: the whole head runs
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens, targets=None, reduction="mean", **kw):
            return self.inner(tokens, targets, reduction=reduction, **kw)

    whole = Whole(ref)
    for step in range(3):
        micro = [_batch(step)]
        a = train_step(fast, opt_fast, micro, info, vocab=VOCAB)
        b = train_step(whole, opt_ref, micro, info, vocab=VOCAB)
        for k in ("loss", "text_loss", "image_loss", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])), (step, k, a[k], b[k])
    for p, q in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
