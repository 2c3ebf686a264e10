"""How far merged inference drifts from unmerged inference when the frozen weights are bfloat16.

    python benchmarks/merge_error_bf16.py     # GPT-2 small's shape, c_attn + c_proj adapted, 8 x 64 tokens

A randomly initialised GPT-2 small (``transformers``' default ``GPT2Config``: 12 layers, 768 wide, 50,257
tokens; seed 0, no download; dropout 0) is stored in bfloat16 and given float32 LoRA adapters with
``lora.inject``, whose B is filled with N(0, --b_std) values so that the update is not zero. The logits of the
same tokens are then computed unmerged (the update added on the fly, in float32, to each bfloat16 matmul's
output) and merged (``model.eval()``: each update folded into its bfloat16 weight, which rounds it to bfloat16).
Beside their difference the script prints, for scale, how far each is from the float32 model with the same
values (weights and adapters upcast exactly), i.e. bfloat16's own error on this model.
"""
import argparse
import copy

import torch

import loralib as lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8x64", help="batch x sequence")
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--b_std", type=float, default=0.002,
                    help="std of the random B values (0.002 moves the logits by about a sixth of their std)")
    ap.add_argument("--targets", default="c_attn,c_proj")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    import transformers  # an example-side dependency, not loralib's

    if args.threads:
        torch.set_num_threads(args.threads)
    batch, seq = (int(v) for v in args.tokens.split("x"))
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(torch.bfloat16).eval()
    names = lora.inject(model, args.targets.split(","), r=args.r, lora_alpha=args.alpha)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=args.b_std)
    tok = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))

    ref = copy.deepcopy(model).float()  # float32 weights with the same values; adapters already float32
    ref.train()  # unmerged (every dropout probability is 0, so train mode computes what eval mode does)
    with torch.no_grad():
        want = ref(tok).logits.double()
        model.train()  # unmerged
        unmerged = model(tok).logits.double()
        model.eval()  # merges every update into its bfloat16 weight
        merged = model(tok).logits.double()
    assert all(model.get_submodule(n).merged for n in names)

    def stats(a, b):
        d = (a - b).abs()
        return f"max {d.max().item():.4f}, mean {d.mean().item():.5f}"

    print(f"GPT-2 small shape, bfloat16 base, float32 LoRA r={args.r} alpha={args.alpha} on {args.targets} "
          f"({len(names)} layers), B ~ N(0, {args.b_std}), {batch}x{seq} tokens")
    print(f"logits (float32 model): std {want.std().item():.4f}, max |logit| {want.abs().max().item():.4f}")
    with torch.no_grad():
        for n in names:
            ref.get_submodule(n).lora_B.zero_()
        no_update = ref(tok).logits.double()
    print(f"the update's own effect (float32, with vs without it): {stats(want, no_update)}")
    print(f"merged vs unmerged (both bfloat16):                     {stats(merged, unmerged)}")
    print(f"unmerged bfloat16 vs float32:                           {stats(unmerged, want)}")
    print(f"merged bfloat16 vs float32:                             {stats(merged, want)}")


if __name__ == "__main__":
    main()
