"""Training engine and helpers for the Faster R-CNN Dataloop adapter."""
