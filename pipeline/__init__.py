"""medfocus.pipeline."""
