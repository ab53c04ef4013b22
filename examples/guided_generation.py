"""A desktop-assistant style conversation that changes its objectives mid-conversation.

    python examples/guided_generation.py [BUNDLE_DIR]

Without BUNDLE_DIR it uses the default pack (positive and concise ARMs; built on
first use with `edge-genarm pack build`). Each turn keeps the conversation so far
(the KV caches keep the shared prefix, so a turn costs only its new tokens); the
user's settings panel changes the ARM weights between turns.
"""

import sys

import edge_genarm
from edge_genarm.pack import built_bundle

TURNS = [
    # (what the user types, the weights the assistant's settings panel is at)
    ("My flight got delayed by six hours. Any advice?", {"positive": 0.0, "concise": 0.0}),
    ("Thanks. Can you cheer me up a bit?", {"positive": 1.0, "concise": 0.0}),
    ("Now just give me one thing to do right now.", {"positive": 0.5, "concise": 1.0}),
]


def main(bundle: str | None) -> None:
    bundle = bundle or built_bundle("default")
    if bundle is None:
        sys.exit("no bundle given and the default pack is not built: run `edge-genarm pack build`")
    engine = edge_genarm.load(str(bundle))
    print("ARMs and default weights:", engine.weights)
    messages = [{"role": "system", "content": "You are a helpful desktop assistant."}]
    for text, weights in TURNS:
        weights = {n: w for n, w in weights.items() if n in engine.weights}  # a bundle may lack one
        messages.append({"role": "user", "content": text})
        print(f"\nuser: {text}\n[weights {weights}]\nassistant: ", end="", flush=True)
        reply = []
        gen = engine.stream(messages, weights=weights, seed=0, max_tokens=80, temperature=0.7)
        for rec in gen:
            reply.append(rec.text)
            print(rec.text, end="", flush=True)
        s = gen.timings.summary()
        print(f"\n[{s['tokens']} tokens, {s['tok_per_s']:.1f} tok/s]")
        messages.append({"role": "assistant", "content": "".join(reply)})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
