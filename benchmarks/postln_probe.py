"""Why Post-LN + ProRes stalls in the CPU miniature: representation (rank) collapse.

    python benchmarks/postln_probe.py baseline     # and: ... linear
Trains the quality benchmark's Post-LN 24-layer configuration for 70 steps, then prints the branch
weight norms and the mean cosine similarity between the hidden states of different positions after
layers 1, 8, 16 and 24 (1.0 = every position carries the same vector, so only the unigram
distribution can be predicted).
"""
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks')); sys.path.insert(0, str(ROOT))
import quality
from prores_algo.config import load_config
from prores_algo import train
variant = sys.argv[1]
spec = quality.make_spec('post', 24, variant, 0, quality.MODES['full'])
cfg = load_config(quality.YAML, quality.overrides(spec, quality.DATA))
tr = train.build_trainer(cfg)
tr.fit(duration='70ba')
m = tr.state.model.model
print(variant, 'o_proj |W| L1,8,16,24', [round(float(m.blocks[i].attn.o_proj.weight.norm()), 2) for i in (0, 7, 15, 23)],
      'down |W|', [round(float(m.blocks[i].mlp.down_proj.weight.norm()), 2) for i in (0, 7, 15, 23)],
      'norm2 w mean', [round(float(m.blocks[i].norm2.weight.mean()), 3) for i in (0, 7, 15, 23)], flush=True)
x = torch.randint(0, 257, (4, 64))
with torch.no_grad():
    cos, sin = m.rope(64); h = m.embed(x)
    for i, b in enumerate(m.blocks):
        h = b(h, cos, sin)
        if i in (0, 7, 15, 23):
            hn = h / h.norm(dim=-1, keepdim=True)
            sim = (hn.reshape(-1, 64) @ hn.reshape(-1, 64).T).mean().item()
            print(variant, 'layer', i, 'mean cosine between positions', round(sim, 3), flush=True)
