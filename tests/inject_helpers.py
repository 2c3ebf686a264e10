"""Small models shared by test_inject / test_adapters / test_adapter_io / test_peft_export."""
import copy

import pytest
import torch
import torch.nn as nn

VOCAB = 64


def tiny_gpt2_config(**kw):
    transformers = pytest.importorskip("transformers")
    args = dict(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    args.update(kw)
    return transformers.GPT2Config(**args)


def tiny_gpt2(seed=0, **kw):
    """A random GPT2LMHeadModel in eval mode (dropout 0, so train and eval modes compute the same)."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(tiny_gpt2_config(**kw)).eval()


def ids(seed=1, batch=2, length=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


class ConvNet(nn.Module):
    """Every layer kind inject supports besides GPT-2's Conv1D."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=0)
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, (3, 2), padding=1, bias=False)
        self.c3 = nn.Conv3d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, tokens):  # tokens (B, L)
        h = self.emb(tokens).transpose(1, 2)  # (B, 4, L)
        h = torch.relu(self.c1(h))  # (B, 6, L)
        h = torch.relu(self.c2(h.unsqueeze(-1)))  # (B, 8, L + 1 - 2 + 2, 3)
        h = torch.relu(self.c3(h.unsqueeze(-1)))  # (B, 8, ., ., 3)
        return self.head(h.mean(dim=(2, 3, 4)))


def conv_net(seed=0):
    torch.manual_seed(seed)
    return ConvNet().eval()


def tokens(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (3, 7), generator=g)


@torch.no_grad()
def randomize_lora(model, seed=3, std=0.2):
    """Give every LoRA parameter random values (B starts at zero, which would hide any mistake). The layers are
    unmerged first and put back in their mode after, so that merged weights stay consistent."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    for m, mode in modes.items():
        m.train(mode)
    return model


def clone(model):
    return copy.deepcopy(model)
