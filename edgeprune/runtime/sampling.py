"""Token selection from last-token logits: greedy, or seeded sampling with temperature / top-k / top-p.

numpy only, so every backend (torch, ONNX Runtime, TensorRT) shares the exact same decoding rule. Greedy breaks
ties by the lower token id, as ``torch.argmax`` and ``np.argmax`` do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EdgepruneError

MIN_TEMPERATURE = 1e-6  # logits / T must stay finite in float64; a smaller T is greedy decoding anyway
MAX_SEED = 2**64 - 1  # numpy's generators take any non-negative int; 64 bits is what the CLI promises


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding parameters.

    Attributes:
        do_sample: False = greedy.
        temperature: finite, >= 1e-6, divides the logits before softmax.
        top_k: keep the k most likely tokens (0 = all).
        top_p: nucleus mass in (0, 1].
        seed: seed of the private random generator, in [0, 2^64 - 1].
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not MIN_TEMPERATURE <= self.temperature < float("inf"):
            raise EdgepruneError(f"--temperature must be a finite number >= {MIN_TEMPERATURE:g}; got "
                                 f"{self.temperature} (for greedy decoding drop --do-sample)")
        if not 0 <= self.seed <= MAX_SEED:
            raise EdgepruneError(f"--seed must be in [0, 2^64 - 1]; got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise EdgepruneError(f"--top-p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise EdgepruneError(f"--top-k must be >= 0; got {self.top_k}")


class Sampler:
    """Callable that turns a logits vector ``[V]`` into a token id."""

    def __init__(self, config: SamplingConfig | None = None) -> None:
        self.config = config or SamplingConfig()
        self._rng = np.random.default_rng(self.config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """Pick the next token.

        Args:
            logits: [V] float logits of the last position.
        Returns:
            The token id.
        """
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        cfg = self.config
        if not cfg.do_sample:
            return int(np.argmax(logits))
        z = logits / cfg.temperature
        if cfg.top_k and cfg.top_k < z.size:
            kth = np.sort(z)[-cfg.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # smallest prefix with mass >= top_p (tolerance: 0.5 + 0.3 may sum to 0.79999...)
            cut = int(np.searchsorted(cum, cfg.top_p - 1e-9)) + 1
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        return int(self._rng.choice(probs.size, p=probs))
