"""What a run reports: curves.png (curves) and the TensorBoard / W&B / MLflow trackers (visualization)."""
