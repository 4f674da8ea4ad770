"""Evaluation: encoding at scale and MTEB's metrics on the user's own files.

- `encoder.Encoder`: length-sorted, bucketed, sharded encoding (`length_buckets` for finer buckets);
- `tasks`: `TaskSpec`, `load_task_specs` (task files or names from the shipped instruction tables);
- `run`: `evaluate(specs, encoder)`, `summary_table`, `write_results` (mteb's result-file shape);
- `evaluators` / `metrics`: one evaluator per task type, mteb's definitions in numpy (+ scikit-learn
  for logistic regression and k-means);
- `mteb_model.QZhouMtebModel`: the model as an `mteb` encoder (imports `mteb`);
- `cli.add_eval_parser`: the `qzhou-jax eval` command.
"""
