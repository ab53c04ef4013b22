"""Guided generation from Python: load a bundle, change objective weights between turns.

python examples/guided_generation.py BUNDLE_DIR
"""

import sys

import edge_genarm


def main(bundle: str) -> None:
    engine = edge_genarm.load(bundle)
    print("ARMs:", engine.weights)
    messages = [{"role": "user", "content": "My flight got delayed by six hours. Any advice?"}]
    for label, weights in [("unguided", {n: 0.0 for n in engine.weights}), ("guided", None)]:
        reply = engine.generate(messages, seed=0, max_tokens=80, weights=weights)
        print(f"--- {label}: {reply.timings.summary()['tok_per_s']:.1f} tok/s\n{reply.text}\n")
        if weights is None:
            break
        engine.set_weights({n: 1.0 for n in engine.weights})


if __name__ == "__main__":
    main(sys.argv[1])
