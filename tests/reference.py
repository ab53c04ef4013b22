"""Independent reference computations for the tests: float64, full sorts, no shortcuts."""

import numpy as np


def ref_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - np.log(np.sum(np.exp(x - x.max()))) - x.max()


def ref_distribution(scores, temperature, top_k, top_p, min_p):
    """Full sort, step by step, in float64: the textbook definition."""
    s = np.asarray(scores, dtype=np.float64)
    if temperature == 0:
        p = np.zeros_like(s)
        p[np.argmax(s)] = 1
        return p
    p = np.exp(ref_log_softmax(s / temperature))
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(s.size, bool)
    keep[order] = True
    if top_k > 0:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0)
    q /= q.sum()
    if top_p < 1:
        cum, kept = 0.0, np.zeros(s.size, bool)
        for i in order:
            if not keep[i]:
                break
            kept[i] = True
            cum += q[i]
            if cum >= top_p:
                break
        keep &= kept
        q = np.where(keep, q, 0)
        q /= q.sum()
    if min_p > 0:
        keep &= q >= min_p * q.max()
        q = np.where(keep, q, 0)
        q /= q.sum()
    return q
