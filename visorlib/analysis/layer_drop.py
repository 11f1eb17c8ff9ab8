"""What dropping vision costs: accuracy with the visual tokens removed from random sets of layers (Fig. 4).

For a random subset ``S`` of decoder layers, every layer in ``S`` runs on the text tokens only:
its attention never sees the image, and the visual tokens pass through it unchanged. That is
exactly what the executor already does for a VISOR layer that is not executed (a *text-only*
layer), so "drop vision at S" is a plan-level request, not new model code: a
:class:`~visorlib.visor.LayerRequest` whose executed self-attention layers are the model's
minus ``S``. On a dense model every layer can drop vision; on a VISOR model the layers that can
are the executed self-attention layers of the measured configuration (cross-attention layers
always read the image: they are part of the architecture, not of the configuration).

Each subset is scored by greedy generation with the evaluation code
(:func:`~visorlib.eval.runner.generate_batch` and the samples' own metrics), per group (dataset, or
dataset/category). Across subsets each group has an accuracy profile; the Pearson correlation of
the profiles is the dataset-by-dataset matrix of the paper's Fig. 4 (right). The groups then split
into a *hard* (vision-sensitive) and an *easy* cluster: average linkage on the Euclidean distance
between their *relative drop* profiles (``1 - accuracy / full accuracy`` per subset), and the
cluster with the larger mean drop is called hard (unless its mean drop is under 5 %: then no
group is sensitive and all are easy). The split uses the drops themselves, not the
correlation, because an insensitive dataset has a nearly flat profile whose correlation with
anything is noise; the correlation says which datasets react alike, the drops say how much.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from ..visor import LayerRequest


def droppable_layers(model, sa_layers: object = None) -> list[int]:
    """Layers whose vision can be dropped: every layer (dense), or the executed SA layers (VISOR)."""
    request = model.language_model.request(sa_layers, 1)
    if request.routed:
        raise ValueError("layer drop runs fixed configurations; pass layers, 'all' or None, not 'router'")
    return list(request.configurations[0])


def drop_request(model, dropped: Sequence[int], batch: int, sa_layers: object = None) -> LayerRequest:
    """The request that runs ``sa_layers`` with the layers ``dropped`` text-only, for ``batch`` samples.

    Raises:
        ValueError: A dropped layer that cannot drop vision (not in :func:`droppable_layers`).
    """
    base = droppable_layers(model, sa_layers)
    wrong = sorted(set(dropped) - set(base))
    if wrong:
        raise ValueError(f"layers {wrong} cannot drop vision in {model.cfg.name} (droppable: {base})")
    kept = tuple(i for i in base if i not in set(dropped))
    return LayerRequest(tuple(kept for _ in range(batch)), "given")


def random_subsets(layers: Sequence[int], count: int, seed: int = 0) -> list[list[int]]:
    """The empty subset, then ``count`` distinct random non-empty subsets of ``layers``.

    A subset's size is drawn uniformly from ``1..len(layers)``, then its members uniformly, so
    small and large drops are equally represented (a uniform subset would almost always drop
    about half the layers).
    """
    rng = random.Random(seed)
    layers = sorted(layers)
    possible = 2 ** len(layers) - 1
    out: list[list[int]] = [[]]
    seen: set[tuple[int, ...]] = set()
    while len(out) <= min(count, possible):
        subset = tuple(sorted(rng.sample(layers, rng.randint(1, len(layers)))))
        if subset not in seen:
            seen.add(subset)
            out.append(list(subset))
    return out


@torch.inference_mode()
def layer_drop_scores(model, processor, encoded: Sequence[dict], samples: Sequence, subsets: Sequence[Sequence[int]],
                      batch_size: int = 8, max_new_tokens: int = 32, sa_layers: object = None,
                      progress: bool = True) -> list[list[float]]:
    """Each sample's score under each subset: ``[subsets][samples]``.

    Args:
        model: A visorlib model.
        processor: Its processor.
        encoded: Prompts (:func:`~visorlib.eval.runner.encode_prompt`), one per sample.
        samples: The :class:`~visorlib.eval.datasets.EvalSample` s (answers and metric).
        subsets: Layers to drop, one list per measurement (``[]`` is the unmodified model).
        batch_size: Prompts generated together.
        max_new_tokens: Longest answer.
        sa_layers: The configuration measured (VISOR models; None: the card's default).
        progress: Show a progress bar.
    """
    from tqdm import tqdm

    from ..eval.metrics import score
    from ..eval.runner import generate_batch

    out = []
    with tqdm(total=len(subsets) * len(samples), desc="layer drop", unit="sample", disable=not progress) as bar:
        for subset in subsets:
            scores = []
            for start in range(0, len(samples), batch_size):
                part = list(range(start, min(start + batch_size, len(samples))))
                request = drop_request(model, subset, len(part), sa_layers)
                results = generate_batch(model, processor, [encoded[i] for i in part], request, max_new_tokens)
                for i, result in zip(part, results, strict=True):
                    s = samples[i]
                    scores.append(float(score(s.metric, result.text, s.answers, **s.metric_options)))
                bar.update(len(part))
            out.append(scores)
    return out


def correlation(profiles: dict[str, Sequence[float]]) -> list[list[float | None]]:
    """Pearson correlation of the groups' accuracy profiles (None where a profile is constant)."""
    names = list(profiles)
    values = torch.tensor([list(profiles[n]) for n in names], dtype=torch.float64)
    centred = values - values.mean(dim=1, keepdim=True)
    norm = centred.norm(dim=1)
    corr = (centred @ centred.T) / (norm[:, None] * norm[None, :])
    return [[None if not torch.isfinite(corr[i, j]) else float(corr[i, j]) for j in range(len(names))]
            for i in range(len(names))]


def easy_hard(profiles: dict[str, Sequence[float]], min_drop: float = 0.05) -> dict[str, str]:
    """Each group labelled ``"easy"`` or ``"hard"`` (see the module docstring); {} for fewer than 2 groups.

    Args:
        profiles: Accuracy per subset, the unmodified model's (the empty subset) first.
        min_drop: A cluster whose mean relative drop is below this is not called hard: when no
            group is sensitive, every group is easy (two clusters of noise are not a finding).
    """
    names = list(profiles)
    if len(names) < 2:
        return {}
    drops = {n: _relative_drops(profiles[n]) for n in names}
    clusters = [[n] for n in names]

    def distance(a: list[str], b: list[str]) -> float:
        pairs = [math.dist(drops[i], drops[j]) for i in a for j in b]
        return sum(pairs) / len(pairs)

    while len(clusters) > 2:  # average linkage: merge the closest pair
        i, j = min(((i, j) for i in range(len(clusters)) for j in range(i + 1, len(clusters))),
                   key=lambda p: distance(clusters[p[0]], clusters[p[1]]))
        clusters[i] += clusters.pop(j)
    mean = [sum(sum(drops[n]) / max(len(drops[n]), 1) for n in c) / len(c) for c in clusters]
    hard = clusters[0] if mean[0] >= mean[1] else clusters[1]
    if max(mean) < min_drop:
        hard = []
    return {n: "hard" if n in hard else "easy" for n in names}


def _relative_drops(profile: Sequence[float]) -> list[float]:
    """``1 - accuracy / full accuracy`` for each non-empty subset (0 when the full model scores 0)."""
    full = profile[0]
    return [1 - a / full if full > 0 else 0.0 for a in profile[1:]]
