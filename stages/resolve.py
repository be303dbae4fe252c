"""The resolve stage: today's content specs of segment and features, written where DVC can compare them.

``dvc repro`` runs this stage every time (it is cheap: no model is built) because what ``auto`` resolves to can change
without any tracked file changing: weights that arrive in the Hugging Face cache, a hub that becomes reachable. Its
two outputs change only when a spec does, so segment and features rerun exactly then:

- ``segment.spec.json``: the mask store's spec and key;
- ``features.spec.json``: the encoder actually used, the feature stores' specs and keys (each naming the mask store
  it reads), and the class names and prompts whose text embeddings the stores hold.
"""

from __future__ import annotations

import logging

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.manifest import write_json
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.specs import resolve_segment

from .common import load_prepared
from .stores import resolve_features_for

log = logging.getLogger(__name__)


def resolve(dataset: DatasetSpec, params: Params, paths: DatasetPaths) -> dict:
    prepared = load_prepared(dataset, params, paths, progress=False)
    segment = resolve_segment(params.segment, dataset.name)
    features = resolve_features_for(dataset, params, prepared, list(params.features.modes))
    if features.encoder.note:
        log.info("%s", features.encoder.note)
    segment_content = {"key": segment.key, "spec": segment.content}
    write_json(paths.segment_spec, segment_content)
    write_json(paths.features_spec, features.content())
    return {"segment": segment.key, "features": {mode: store.key for mode, store in features.stores.items()},
            "encoder": features.encoder.identity["model"], "weights_source": features.encoder.weights_source}
