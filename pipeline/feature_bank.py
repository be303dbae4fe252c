"""An encoder bank's feature stores read as one store: what the trainer fuses.

Each encoder of a bank (``features.model: litemedsam+efficientnet_lite2``) has its own stores, keyed as if it ran
alone. Read through :class:`FeatureBank`, an image's ``global`` is the concatenation of every encoder's L2-normalised
global embedding (so each encoder weighs the same, whatever its width), ``roi_global`` (mode ``dual``) the same for
the ROI views, and ``patches`` / ``roi_weights`` are the first encoder's: the fusion head attends over one token grid.
The bank has no class text (its joined space has no text tower): every method starts from class prototypes.

Its identity (what a trained head must match) names every encoder, its weights and its store, so a head trained on
one bank is never taken for another's.
"""

from __future__ import annotations

import numpy as np

from medfocus.pipeline.store import FeatureStore, store_key

BANK_FAMILY = "bank"
JOINED_ARRAYS = ("global", "roi_global")  # joined across encoders; the other arrays are the first encoder's
# In the bank's key: a head trained on one way of joining is never served features joined another way.
JOIN_RULE = "concatenated L2-normalised global and roi_global; the first encoder's patches and roi_weights"


def _normalised(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    return array / max(float(np.linalg.norm(array)), 1e-12)


def join_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One image's arrays from each encoder of a bank (the first encoder first) -> the bank's arrays."""
    joined = dict(rows[0])
    for name in JOINED_ARRAYS:
        if name in rows[0]:
            joined[name] = np.concatenate([_normalised(row[name]) for row in rows])
    return joined


def bank_identity(identities: list[dict]) -> dict:
    """The encoder identity of a bank: every encoder's name, weights and sha256, in order."""
    return {"family": BANK_FAMILY, "model": "+".join(identity["model"] for identity in identities),
            "weights_sha256": "+".join(str(identity["weights_sha256"]) for identity in identities),
            "members": identities}


def bank_weights_source(sources: list[str]) -> str:
    """The weights of every encoder, in order (random-init anywhere shows: pipeline.provenance.is_random_init)."""
    return " + ".join(sources)


class FeatureBank:
    """The stores of one mode of every encoder of a bank, read as one :class:`FeatureStore` (the reading part)."""

    def __init__(self, stores: list[FeatureStore]):
        if len(stores) < 2:
            raise ValueError("an encoder bank has at least two encoders")
        modes = {store.mode for store in stores}
        if len(modes) != 1:
            raise ValueError(f"an encoder bank's stores must be of one mode, got {sorted(modes)}")
        self.stores = stores
        self.url = " + ".join(store.url for store in stores)

    @property
    def mode(self) -> str:
        return self.stores[0].mode

    @property
    def key(self) -> str:
        return store_key({"bank": [store.key for store in self.stores], "join": JOIN_RULE})

    @property
    def attrs(self) -> dict:
        first = self.stores[0].attrs
        spec = dict(first["spec"]) | {"encoder": bank_identity([store.attrs["spec"]["encoder"] for store in self.stores]),
                                      "bank_stores": [store.key for store in self.stores]}
        provenance = dict(first["provenance"]) | {
            "weights_source": bank_weights_source([store.attrs["provenance"]["weights_source"] for store in self.stores])}
        return {"key": self.key, "spec": spec, "provenance": provenance}

    def locator(self) -> list[tuple[str, str]]:
        return [(store.url, store.key) for store in self.stores]

    def done(self, digests: list[str]) -> set[str]:
        done = set(digests)
        for store in self.stores:
            done &= store.done(sorted(done))
        return done

    def read_image(self, digest: str, names: tuple[str, ...] | None = None) -> tuple[dict[str, np.ndarray], dict]:
        first, attrs = self.stores[0].read_image(digest, names)
        joined = tuple(name for name in first if name in JOINED_ARRAYS)
        rows = [first] + [store.read_image(digest, joined)[0] for store in self.stores[1:]]
        return join_rows(rows), attrs

    def has_shared(self, name: str) -> bool:
        return False  # no class text: the bank's joined space has no text tower


def feature_store_locator(store: FeatureStore | FeatureBank) -> list[tuple[str, str]]:
    """(url, key) of each store behind ``store``: enough to open it again in another process."""
    return store.locator() if isinstance(store, FeatureBank) else [(store.url, store.key)]


def open_feature_store(locator: list[tuple[str, str]], dataset: str, mode: str) -> FeatureStore | FeatureBank:
    stores = [FeatureStore.lookup(url, key, dataset, mode) for url, key in locator]
    return FeatureBank(stores) if len(stores) > 1 else stores[0]
