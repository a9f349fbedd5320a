"""Stable pseudo-embeddings: a text's vector is the normalized sum of its words' hashed vectors.

Every word maps to a fixed random unit-variance vector seeded by its hash, so the same text always
gets the same vector on any machine, and texts that share words are closer (cosine) than texts
that share none. Not a language model: a simulator's stand-in with the right shape and dtype.

Examples
--------
>>> import numpy as np
>>> from dfbatch.sim.embedding import embed_texts
>>> v = embed_texts(["the cat sat", "the cat sat", "a cat sat down", "quantum flux"], 64)
>>> v.shape, v.dtype, bool(np.allclose(v[0], v[1]))
((4, 64), dtype('float32'), True)
>>> bool(v[0] @ v[2] > v[0] @ v[3]), round(float(np.linalg.norm(v[0])), 4)
(True, 1.0)
"""

from __future__ import annotations

import base64
import functools
import re

import numpy as np

from dfbatch.sim.content import digest

_TOKEN = re.compile(r"\w+", re.UNICODE)


@functools.lru_cache(maxsize=65_536)
def _word_vector(word: str, dims: int) -> np.ndarray:
    return np.random.default_rng(digest("w", word)).standard_normal(dims).astype(np.float32)


def embed_texts(texts: list[str], dims: int) -> np.ndarray:
    """``(len(texts), dims)`` float32 unit vectors, deterministic per text."""
    out = np.zeros((len(texts), dims), dtype=np.float32)
    for i, text in enumerate(texts):
        words = [w.lower() for w in _TOKEN.findall(text)] or [f"\x00{text}"]
        for word in words:
            out[i] += _word_vector(word, dims)
        norm = float(np.linalg.norm(out[i]))
        out[i] /= norm if norm > 0 else 1.0
    return out


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI returns it: a list of floats or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
