"""Print launch/README.md's device-memory table (estimates from meta_mask.training.memory).

    python launch/memory_table.py                 # the README table
    python launch/memory_table.py --device_gib=40 # plus the smallest fsdp that fits a 40 GiB card

The formulas are validated against jax's saved residuals and XLA's memory_analysis() of the
compiled train step and meta step on tiny configs (tests/training/test_memory.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from meta_mask.config import MetaConfig, ModelConfig  # noqa: E402
from meta_mask.training import memory  # noqa: E402

BART = {
    "BART-base": ModelConfig(),  # the defaults are facebook/bart-base's architecture
    "BART-large": ModelConfig(
        d_model=1024,
        encoder_layers=12,
        decoder_layers=12,
        encoder_attention_heads=16,
        decoder_attention_heads=16,
        encoder_ffn_dim=4096,
        decoder_ffn_dim=4096,
    ),
}
# Per device: intermediate MLM batches of 32 sentences x 128 tokens, masked_spans targets of 32
# (experiments/nq.flags); meta (second order, remat, SGD inner steps): MetaConfig's 8 inner
# sentences and 8 outer QA examples (question 32 tokens, answer 16).
BATCH, SRC, TGT = 32, 128, 32
OUTER_SRC, OUTER_TGT = 32, 16
GIB = 2**30


def policy_params(meta: MetaConfig) -> int:
    d, f = meta.policy_d_model, meta.policy_ffn_dim
    return meta.policy_layers * (4 * d * d + 2 * d * f)


def rows() -> list[tuple[str, str, memory.Estimate, memory.Estimate]]:
    """(model, setting, fp32 estimate, bf16 estimate) for every row of the table."""
    meta = MetaConfig()
    out = []
    for name, cfg in BART.items():
        settings = {
            "heuristic policy": lambda c: memory.train_step_memory(c, BATCH, SRC, TGT),
            "heuristic, remat": lambda c: memory.train_step_memory(
                c.replace(remat=True), BATCH, SRC, TGT
            ),
        }
        for k, segment, remat in ((1, 0, False), (4, 0, False), (8, 0, False), (8, 3, False),
                                  (8, 3, True), (32, 6, True)):  # fmt: skip
            label = f"meta K={k}" + (f", remat_segment={segment}" if segment else "")
            label += ", model remat" if remat else ""
            settings[label] = lambda c, k=k, segment=segment, remat=remat: memory.meta_step_memory(
                c.replace(remat=remat),
                dataclasses.replace(meta, inner_steps=k, remat_segment=segment),
                src=SRC,
                tgt=TGT,
                outer_src=OUTER_SRC,
                outer_tgt=OUTER_TGT,
                policy_params=policy_params(meta),
            )
        for label, estimate in settings.items():
            out.append((name, label, estimate(cfg), estimate(cfg.replace(dtype="bfloat16"))))
    return out


def smallest_fsdp(total_state: int, activations: int, device_bytes: float) -> int | None:
    """The smallest power-of-two fsdp size whose per-device memory fits `device_bytes`."""
    for fsdp in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        if total_state / fsdp + activations <= device_bytes:
            return fsdp
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device_gib", type=float, default=0.0, help="device memory, GiB")
    args = parser.parse_args()
    header = (
        "| model | setting | params (M) | state: params+grads+opt (GiB) "
        "| activations fp32 / bf16 (GiB) | total fp32 / bf16 (GiB) |"
    )
    if args.device_gib:
        header += f" fsdp for {args.device_gib:g} GiB (bf16) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, label, fp32, bf16 in rows():
        state = fp32.params + fp32.gradients + fp32.optimizer
        line = (
            f"| {name} | {label} | {memory.num_params(BART[name]) / 1e6:.0f} "
            f"| {state / GIB:.2f} | {fp32.activations / GIB:.2f} / {bf16.activations / GIB:.2f} "
            f"| {fp32.total / GIB:.2f} / {bf16.total / GIB:.2f} |"
        )
        if args.device_gib:
            fsdp = smallest_fsdp(state, bf16.activations, 0.9 * args.device_gib * GIB)
            line += f" {fsdp or 'does not fit'} |"
        print(line)


if __name__ == "__main__":
    main()
