"""Fast guidance: run the ARMs only where the base is unsure (issue 21, "steer only where it matters").

At a step whose base next-token entropy is below `FAST_TAU` nats the ARMs are skipped and the
base's own (penalised) log-probs are sampled; at the next step above it every active unit
catches up on the positions it skipped, in one batch, from its cache (never a hole: the
units' `prefill` feeds exactly the missing tokens). The exact mode (`exact=True`) runs every
ARM at every step and is bit for bit the reference; each approximation lives here and is off
in it.

At a guided step the ARMs' LM head is restricted to the base's most likely tokens
(`FAST_CANDIDATES`): see there.

Where the pack has a mix head (backends/mix.py: one head conditioned on the weights, trained
on every objective's pairs at random mixes), the fast mode runs it instead of one head per
objective: `log p_base + S * log pi_alpha`, S the weights' sum, alpha their fractions. Two
objectives then cost one 4-layer head instead of two 8-layer ones. Weights it was not trained
on (a negative weight, another ARM) run the separate heads, with a logged reason.

Why entropy: at weight w an ARM moves a token's score by w * log p_arm, which can change the
pick only where the base leaves room. The measured share of steps below the threshold, how
often the pick then differs from the exact mode's, and the speed are in docs/speed.md.
"""

from __future__ import annotations

from .errors import ConfigError

FAST_TAU = 0.5  # nats: below this base entropy a step is decoded without the ARMs
# At a guided step the heads' LM head computes only the logits of the base's FAST_CANDIDATES
# most likely tokens (in numpy, from its rows: backends.trunk.LMRows), and only those can be
# drawn. The ARM's normalizer is one number per step, and sampling is shift-invariant, so over
# those tokens the scores are the exact mode's up to that number; what is lost is the exact
# mode's mass on tokens past the base's top FAST_CANDIDATES (measured: docs/speed.md). Off with
# nudging, whose rollouts score tokens anywhere in the vocabulary.
FAST_CANDIDATES = 128
# The default mode, where a request does not say: the fast mode where the bundle's mix head serves
# the request's weights (it met issue 21's bar on the default pack: docs/speed.md, "The end of the
# reply"), else the exact mode (the fast mode on separate ARM heads kept 53-86% of the gain at some
# weights: docs/speed.md, "The fast mode").
DEFAULT_EXACT = True  # without a mix head for the weights
DEFAULT_EXACT_WITH_MIX = False


def default_exact(mix_serves: bool) -> bool:
    """The mode a request gets when it does not choose: `mix_serves`, the engine's mix head can run
    these weights (backends.mix.MixUnit.plan) and nothing else (nudging) needs the ARMs."""
    return DEFAULT_EXACT_WITH_MIX if mix_serves else DEFAULT_EXACT


def gate_tau(exact, guided: bool) -> float | None:
    """The entropy threshold this request decodes with: None (every step guided) in the exact
    mode or when no ARM is active. `exact` None means the default; anything but a bool is refused."""
    if exact is None:
        exact = DEFAULT_EXACT
    if not isinstance(exact, bool):
        raise ConfigError(f"exact must be true or false, got {exact!r}")
    return None if exact or not guided else FAST_TAU
