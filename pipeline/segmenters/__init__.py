"""medfocus.pipeline.segmenters."""
