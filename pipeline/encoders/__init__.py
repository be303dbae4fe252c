"""medfocus.pipeline.encoders."""
