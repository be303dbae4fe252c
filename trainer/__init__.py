"""medfocus.trainer."""
