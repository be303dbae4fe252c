"""medfocus.stages."""
