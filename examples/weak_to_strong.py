"""Weak-to-strong: a small ARM (a few layers) guiding a larger base.

    python examples/weak_to_strong.py BUNDLE_DIR ARM_NAME [WEIGHT] [BASE.gguf]

BASE.gguf: another base for the bundle's ARM to guide (the command line's `--base`), e.g.
SmolLM2-1.7B under the default pack's 135M ARMs; it must share the ARM's tokenizer.

Prints the same prompts unguided and guided with the same seeds, the mean
per-token ARM log-prob of each reply (the ARM's own reward), and the speed.
"""

import sys

import edge_genarm

PROMPTS = [
    "My flight got delayed by six hours. Any advice?",
    "Describe a rainy Monday morning.",
    "Write a short note to a neighbour about their loud music.",
]


def mean_arm_reward(engine, prompt, reply_tokens, arm):
    """Score a finished reply with the ARM alone: sum_t log p_arm(y_t | x, y_<t) / T."""
    ids = engine.tokenize_prompt(engine.format_prompt(prompt))
    model = engine.arms[arm]
    total = 0.0
    logits = model.prefill(ids)
    for t in reply_tokens:
        z = logits[: engine.base.n_vocab]
        total += float(z[t] - edge_genarm.guidance.logsumexp(z))
        logits = model.step(t)
    return total / max(1, len(reply_tokens))


def main(bundle, arm, weight=1.0, base=None):
    engine = edge_genarm.load(bundle, arms=[f"{arm}={weight}"], base=base)
    for i, p in enumerate(PROMPTS):
        for label, guided in (("unguided", False), (f"{arm}={weight}", True)):
            c = engine.generate(p, seed=i, max_tokens=60, guidance=guided)
            r = mean_arm_reward(engine, p, c.tokens, arm)
            s = c.timings.summary()
            print(f"[{label}] ARM reward/token {r:+.3f}, {s['tok_per_s']:.1f} tok/s\n{c.text.strip()}\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 1.0,
         sys.argv[4] if len(sys.argv) > 4 else None)  # fmt: skip
