"""The resolve stage: today's content specs of segment and features, written where DVC can compare them.

``dvc repro`` runs this stage every time (it is cheap: no model is built) because what ``auto`` resolves to can change
without any tracked file changing: weights that arrive in the Hugging Face cache, a hub that becomes reachable. Its
two outputs change only when a spec does, so segment and features rerun exactly then:

- ``segment.spec.json``: the mask store's spec and key;
- ``features.spec.json``: the encoder actually used, the feature stores' specs and keys (each naming the mask store
  it reads), and the class names and prompts whose text embeddings the stores hold;
- ``external.json``: the external test sets whose images the stores will also hold (evaluate.external, see
  :mod:`medfocus.pipeline.external`): their folders sit in a nested params mapping that dvc.yaml's ``foreach`` cannot
  list as dependencies, so this always-run stage lists them (reading no unchanged file again) and rewrites the file
  only when a set's images, classes or class map change;
- ``external_groups.json``: each external set's groups file and its sha256 (evaluate's dependency alone).
"""

from __future__ import annotations

import logging

from medfocus.pipeline.config import Params
from medfocus.pipeline.current_stores import resolve_specs
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.external import load_externals, prepare_externals, write_groups_summary
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.preparation import load_prepared

log = logging.getLogger(__name__)


def resolve(dataset: DatasetSpec, params: Params, paths: DatasetPaths) -> dict:
    prepared = load_prepared(dataset, params, paths, progress=False)
    segment, features = resolve_specs(dataset, params, paths, prepared)
    external = prepare_externals(dataset, params, paths, prepared)
    write_groups_summary(load_externals(dataset, params, paths, prepared), params, paths, dataset.name)
    if features.encoder.note:
        log.info("%s", features.encoder.note)
    return {"segment": segment.key, "features": {mode: store.key for mode, store in features.stores.items()},
            "encoder": features.encoder.identity["model"], "weights_source": features.encoder.weights_source,
            **({"bank": [{"encoder": member.encoder.identity["model"], "weights_source": member.encoder.weights_source,
                          "features": {mode: store.key for mode, store in member.stores.items()}}
                         for member in features.bank]} if features.bank else {}),
            "external": {name: item["images"] for name, item in external["sets"].items()}}
