"""The statistics behind `prefalign audit` (docs/audit.md): pure functions of texts, lengths and margins.

Nothing here reads files, tokenizes or runs a model; prefalign.audit does that and turns these
numbers into warnings. Every function returns plain JSON-ready dicts.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict

import numpy as np

# ----------------------------------------------------------------------------- text helpers


def text_of(value) -> str:
    """A field as one string: itself, or a conversation's message contents joined by newlines."""
    if isinstance(value, str):
        return value
    return "\n".join(str(m.get("content") or "") for m in value)


def key_of(value) -> str:
    """A field as an exact, hashable key (roles included for conversations)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


_SPACE = re.compile(r"\s+")


def normalize(value) -> str:
    """Case-folded, whitespace collapsed and stripped (roles kept for conversations)."""
    if not isinstance(value, str):
        value = "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in value)
    return _SPACE.sub(" ", value.casefold()).strip()


# ----------------------------------------------------------------------------- small statistics


def quantiles(values, qs=(0.05, 0.25, 0.5, 0.75, 0.95)) -> dict:
    if len(values) == 0:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{round(q * 100)}": float(np.quantile(arr, q)) for q in qs}


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided sign-test p-value for k successes of n at p = 1/2 (normal approx. above n=2000)."""
    if n == 0:
        return 1.0
    m = max(k, n - k)
    if n > 2000:
        z = (m - 0.5 - n / 2) / math.sqrt(n / 4)
        return min(1.0, math.erfc(z / math.sqrt(2)))
    log_half = n * math.log(0.5)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half)
               for i in range(m, n + 1))
    return min(1.0, 2 * tail)


def point_biserial(x, y) -> float | None:
    """Pearson correlation of x with a 0/1 label y; None when either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


# ----------------------------------------------------------------------------- length bias


def paired_length_stats(chosen_len, rejected_len) -> dict:
    """Length bias of pairs (lengths in characters); see docs/audit.md for each number."""
    c, r = np.asarray(chosen_len, dtype=np.float64), np.asarray(rejected_len, dtype=np.float64)
    d = c - r
    longer, shorter = int((d > 0).sum()), int((d < 0).sum())
    decided = longer + shorter
    rms = math.sqrt(float((d ** 2).mean())) if len(d) else 0.0
    ratio = c / np.maximum(r, 1)
    return {
        "pairs": len(d),
        "chosen_longer": longer, "rejected_longer": shorter, "ties": len(d) - decided,
        "share_chosen_longer": longer / decided if decided else None,
        "sign_test_p": binom_two_sided(longer, decided),
        # The point-biserial correlation of the length difference with the label when each pair is
        # shown in both orders (a-b labelled 1 when a is chosen, 0 when a is rejected): mean(d)/rms(d).
        "point_biserial": float(d.mean()) / rms if rms > 0 else None,
        "mean_chars_chosen": float(c.mean()) if len(c) else None,
        "mean_chars_rejected": float(r.mean()) if len(r) else None,
        "ratio_quantiles": quantiles(ratio),
        "chosen_at_least_2x": int((ratio >= 2).sum()),
        "rejected_at_least_2x": int((r >= 2 * c).sum()),
    }


def unpaired_length_stats(lengths, labels) -> dict:
    x, y = np.asarray(lengths, dtype=np.float64), np.asarray(labels, dtype=bool)
    good, bad = x[y], x[~y]
    return {
        "desirable": int(y.sum()), "undesirable": int((~y).sum()),
        "mean_chars_desirable": float(good.mean()) if len(good) else None,
        "mean_chars_undesirable": float(bad.mean()) if len(bad) else None,
        "point_biserial": point_biserial(x, y),
        "quantiles_desirable": quantiles(good), "quantiles_undesirable": quantiles(bad),
    }


# ----------------------------------------------------------------------------- style markers

STYLE_MARKERS = {
    "markdown_header": re.compile(r"^\s{0,3}#{1,6}\s+\S", re.M),
    "list": re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+\S", re.M),
    "bold": re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__"),
    "code_block": re.compile(r"```|~~~"),
    "apology": re.compile(r"\bi(?:'|’)?m sorry\b|\bi am sorry\b|\bi apologi[sz]e\b|\bmy apologies\b|\bsorry, but\b",
                          re.I),
    "emoji": re.compile("[\U0001F300-\U0001FAFF\U0001F600-\U0001F64F\u2600-\u27BF\U0001F1E6-\U0001F1FF]"),
    "exclamation": re.compile(r"!(?![=\[])"),
}


def has_markers(text: str) -> dict:
    return {name: bool(rx.search(text)) for name, rx in STYLE_MARKERS.items()}


def style_stats(pos_texts, neg_texts, paired: bool) -> dict:
    """Per marker: share of positive (chosen/desirable) and negative responses containing it, their ratio;
    for pairs also the discordant counts and McNemar's exact p-value."""
    pos = [has_markers(t) for t in pos_texts]
    neg = [has_markers(t) for t in neg_texts]
    out = {}
    for name in STYLE_MARKERS:
        a = np.array([m[name] for m in pos], dtype=bool)
        b = np.array([m[name] for m in neg], dtype=bool)
        rate_pos = float(a.mean()) if len(a) else 0.0
        rate_neg = float(b.mean()) if len(b) else 0.0
        entry = {"rate_chosen": rate_pos, "rate_rejected": rate_neg, "count_chosen": int(a.sum()),
                 "count_rejected": int(b.sum()),
                 "ratio": rate_pos / rate_neg if rate_neg > 0 else None,
                 "only_in_chosen": bool(rate_neg == 0 and rate_pos > 0),
                 "only_in_rejected": bool(rate_pos == 0 and rate_neg > 0)}
        if paired:
            only_c, only_r = int((a & ~b).sum()), int((~a & b).sum())
            entry.update(pairs_only_chosen=only_c, pairs_only_rejected=only_r,
                         mcnemar_p=binom_two_sided(only_c, only_c + only_r))
        out[name] = entry
    return out


# ----------------------------------------------------------------------------- duplicates


def exact_groups(keys) -> list[list[int]]:
    """Indices grouped by equal key; only groups of two or more, in order of first appearance."""
    groups = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    return [g for g in groups.values() if len(g) > 1]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, vectorized (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _kgram_hashes(text: str, k: int, salt: int) -> np.ndarray:
    """Hashes of the character k-grams (of the UTF-8 bytes) of `text`, salted by field; with repeats."""
    b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    if len(b) < k:
        b = np.concatenate([b, np.zeros(k - len(b), dtype=np.uint64)])
    n = len(b) - k + 1
    h = np.full(n, ((salt + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    for j in range(k):
        h = h * np.uint64(1099511628211) + b[j:j + n]
    return _mix(h)


def shingles(text: str, k: int, salt: int = 0) -> np.ndarray:
    """The sorted set of k-gram hashes of `text`."""
    return np.unique(_kgram_hashes(text, k, salt))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def near_duplicate_clusters(records: list[tuple[str, ...]], threshold: float, k: int = 5, bands: int = 16,
                            rows_per_band: int = 4, seed: int = 0) -> tuple[list[list[int]], int]:
    """Clusters of records (tuples of normalized fields) whose every field has character-k-gram Jaccard
    >= threshold with a neighbour's. MinHash (bands x rows_per_band hashes of field-salted shingles) with
    LSH banding proposes candidates: within each band bucket, each record is checked against the next one
    only, so the work is O(n * bands) comparisons. Returns (clusters of indices, comparisons made)."""
    n = len(records)
    if n < 2:
        return [], 0
    rng = np.random.default_rng(seed)
    num = bands * rows_per_band
    a = rng.integers(1, 2 ** 63, size=num, dtype=np.uint64) | np.uint64(1)
    c = rng.integers(0, 2 ** 63, size=num, dtype=np.uint64)
    sigs = np.empty((n, num), dtype=np.uint64)
    for i, fields in enumerate(records):
        h = np.concatenate([_kgram_hashes(f, k, salt) for salt, f in enumerate(fields)])
        sigs[i] = (h[None, :] * a[:, None] + c[:, None]).min(axis=1)  # a*h + c: a bijection per hash
    cache: dict[tuple[int, int], np.ndarray] = {}

    def field_shingles(i, f):
        if (i, f) not in cache:
            if len(cache) > 8192:
                cache.clear()
            cache[i, f] = shingles(records[i][f], k)
        return cache[i, f]

    uf, compared, seen = _UnionFind(n), 0, set()
    for band in range(bands):
        buckets = defaultdict(list)
        part = sigs[:, band * rows_per_band:(band + 1) * rows_per_band]
        for i in range(n):
            buckets[part[i].tobytes()].append(i)
        for members in buckets.values():
            for i, j in zip(members, members[1:]):
                if (i, j) in seen or uf.find(i) == uf.find(j):
                    continue
                seen.add((i, j))
                # The combined Jaccard is at least the smallest field's, so a pair whose MinHash
                # estimate of it (standard error <= 0.07 at 64 hashes) is far below the threshold is dropped.
                if (sigs[i] == sigs[j]).mean() < threshold - 0.25:
                    continue
                compared += 1
                if all(jaccard(field_shingles(i, f), field_shingles(j, f)) >= threshold
                       for f in range(len(records[i]))):
                    uf.union(i, j)
    clusters = defaultdict(list)
    for i in range(n):
        clusters[uf.find(i)].append(i)
    return [m for m in clusters.values() if len(m) > 1], compared


# ----------------------------------------------------------------------------- reference margins


def margin_stats(margins, k: float) -> dict:
    """Median, MAD, the too-easy threshold median + k * 1.4826 * MAD, and who lies above it."""
    m = np.asarray(margins, dtype=np.float64)
    if len(m) == 0:
        return {}
    med = float(np.median(m))
    mad = float(np.median(np.abs(m - med)))
    threshold = med + k * 1.4826 * mad
    easy = np.nonzero(m > threshold)[0]
    return {"median": med, "mad": mad, "threshold": threshold, "easy": [int(i) for i in easy],
            "share_correct": float((m > 0).mean()), "quantiles": quantiles(m)}
