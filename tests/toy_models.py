"""Toy staged models defined by the tests (the engine must not know them).

``MixerStack`` has blocks of different widths, so per-block costs are uneven and the
balanced split differs from the even one.  Weights come from a seeded generator.
"""
import torch
from torch import nn


class MixerStack(nn.Module):
    def __init__(self, channels=4, widths=(16, 48, 16, 32, 64, 16), context_dim=8, seed=0):
        super().__init__()
        self.channels = channels
        self.inp = nn.Linear(channels, 32)
        self.ctx = nn.Linear(context_dim, 32)
        self.t = nn.Linear(1, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, w), nn.Tanh(), nn.Linear(w, 32)) for w in widths)
        self.out = nn.Linear(32, channels)
        self.num_blocks = len(widths)
        if not any(p.is_meta for p in self.parameters()):
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    def embed(self, x, timestep, context):
        b, c, h, w = x.shape
        tok = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        cond = self.ctx(context).mean(1, keepdim=True) + self.t(timestep.reshape(-1, 1, 1).float() / 1000)
        return {"h": self.inp(tok) + cond, "cond": cond, "hw": torch.tensor([h, w])}

    def run_blocks(self, start, end, state):
        h = state["h"]
        for blk in self.blocks[start:end]:
            h = h + blk(h + state["cond"])
        return {**state, "h": h}

    def head(self, state):
        hh, ww = state["hw"].tolist()
        out = self.out(state["h"])
        return out.reshape(out.shape[0], hh, ww, self.channels).permute(0, 3, 1, 2)

    def block_costs(self):
        return [float(sum(p.numel() for p in b.parameters())) for b in self.blocks]

    def block_bytes(self):
        return [sum(p.numel() * p.element_size() for p in b.parameters()) for b in self.blocks]


def build(**kwargs):
    return MixerStack(**kwargs)
